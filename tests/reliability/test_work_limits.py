"""Every kind of work inside the per-job caps and the running cap (issue 26, items 1 and 3):
sweep spaces whose most expensive point breaks a cap, meta-RL specs the cost model once
passed, the shipped examples under the default caps, and two sweeps of one user never above
the running cap."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from metaserve.service import child_jobs, claims, job_runs, job_store, limits, sweeps
from metaserve.service.exceptions import InvalidSweep
from metaserve.service.orm import Job, JobStatus, Sweep
from metaserve.service.settings import Settings
from metaserve.workers.spec import JobSpec
from metaserve.workers.sweep_spec import SweepSpec
from tests.helpers import bearer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def stored(sessions) -> tuple[int, int]:  # noqa: ANN001
    with sessions() as session:
        return (session.scalar(select(func.count()).select_from(Sweep)),
                session.scalar(select(func.count()).select_from(Job)))


def refusal(response) -> dict[str, str]:  # noqa: ANN001
    assert response.status_code == 422, response.text
    return {d["field"]: d["message"] for d in response.json()["error"]["details"]}


ONE_ITERATION = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}, "iterations": 1}


def test_a_space_whose_largest_point_passes_the_task_cap_is_422_naming_its_path(
        client, alice_key, sessions):  # noqa: ANN001
    # The repro: 201 before, its trials ran 9.9e9 and 2.9e10 tasks.
    body = {"spec": ONE_ITERATION, "search": {"seed": 3},
            "space": {"iterations": {"randint": [1, 10_000_000]},
                      "meta_batch_size": {"randint": [1, 4096]}}}
    details = refusal(client.post("/v1/sweeps", json=body, headers=bearer(alice_key)))
    assert list(details) == ["space.iterations"]
    assert "METASERVE_MAX_META_TASKS" in details["space.iterations"]
    assert stored(sessions) == (0, 0)


def test_a_combination_over_the_caps_names_every_path_it_varies(client, alice_key, sessions):  # noqa: ANN001
    # Each path alone passes (3e6 × the base's 25 tasks; 4,095 × 1 iteration): only their
    # largest values together break the cap.
    body = {"spec": ONE_ITERATION,
            "space": {"iterations": {"randint": [1, 3_000_000]},
                      "meta_batch_size": {"randint": [1, 4096]}}}
    details = refusal(client.post("/v1/sweeps", json=body, headers=bearer(alice_key)))
    assert sorted(details) == ["space.iterations", "space.meta_batch_size"]
    for message in details.values():
        assert "iterations=2999999, meta_batch_size=4095" in message
        assert "METASERVE_MAX_META_TASKS" in message
    assert stored(sessions) == (0, 0)


def test_image_size_times_meta_batch_is_checked_at_their_largest(client, alice_key, sessions):  # noqa: ANN001
    base = {"algorithm": {"name": "maml"}, "task_family": {"name": "glyphs", "image_size": 28},
            "meta_batch_size": 4, "iterations": 1}
    body = {"spec": base, "space": {"task_family.image_size": {"randint": [16, 225]},
                                    "meta_batch_size": {"randint": [1, 65]}}}
    details = refusal(client.post("/v1/sweeps", json=body, headers=bearer(alice_key)))
    message = next(iter(details.values()))
    assert set(details) <= {"space.task_family.image_size", "space.meta_batch_size"}
    assert "METASERVE_MAX_WORKER_MEMORY_MB" in message
    assert stored(sessions) == (0, 0)


def test_every_choice_is_considered_not_only_the_first_combinations(settings_for_limits):  # noqa: ANN001
    # Each value alone passes (30,000 × 25 tasks; 4,096 × 1), and the validity check's product
    # (its first 2,048 specs, the last path varying fastest) never reaches 30,000 × 4,096:
    # the costliest point does.
    body = {"spec": ONE_ITERATION,
            "space": {"iterations": {"choice": [1, 30_000]},
                      "meta_batch_size": {"choice": [1, 4096]},
                      "algorithm.inner_lr": {"choice": [0.001 + i / 1e5 for i in range(1000)]}}}
    with pytest.raises(InvalidSweep) as refused:
        sweeps.validate_sweep(SweepSpec.model_validate(body), settings_for_limits)
    assert sorted(refused.value.details) == ["space.iterations", "space.meta_batch_size"]
    assert "METASERVE_MAX_META_TASKS" in refused.value.details["space.iterations"]


@pytest.fixture
def settings_for_limits(tmp_path: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path / 'unused.db'}", dispatcher=False)


RL_REPROS = {
    # 117 M parameters, horizon 10,000, meta-batch 4,096: 201 before (the estimate was 0)
    "maml_rl": ({"algorithm": {"name": "maml", "policy_gradient": {"hidden": [4096] * 8}},
                 "task_family": {"name": "nav2d", "horizon": 10_000}, "meta_batch_size": 4096},
                {"algorithm.policy_gradient.hidden": "METASERVE_MAX_PARAMETERS",
                 "iterations": "METASERVE_MAX_ENV_STEPS"}),
    # 1,000 arms × 10,000 pulls × 4,096 trials: ~1 TiB of rollouts in the learner
    "rl2": ({"algorithm": {"name": "rl2"}, "task_family": {"name": "bandit", "arms": 1000,
                                                          "pulls": 10_000},
             "meta_batch_size": 4096, "iterations": 1},
            {"meta_batch_size": "METASERVE_MAX_WORKER_MEMORY_MB"}),
    "pearl": ({"algorithm": {"name": "pearl", "hidden": 2048, "gradient_steps": 10_000,
                             "batch_size": 10_000},
               "task_family": {"name": "nav2d"}, "meta_batch_size": 4096, "iterations": 100},
              {"meta_batch_size": "METASERVE_MAX_WORKER_MEMORY_MB",
               "iterations": "METASERVE_MAX_JOB_PFLOP"}),
}


@pytest.mark.parametrize("name", sorted(RL_REPROS))
def test_meta_rl_jobs_over_the_caps_are_422_naming_the_field(name: str, client, alice_key,
                                                             sessions):  # noqa: ANN001
    spec, expected = RL_REPROS[name]
    details = refusal(client.post("/v1/jobs", json=spec, headers=bearer(alice_key)))
    for field, setting in expected.items():
        assert setting in details.get(field, ""), (field, details)
    assert stored(sessions) == (0, 0)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda path: path.name)
def test_the_examples_pass_the_default_caps(path: Path, settings_for_limits: Settings):
    document = yaml.safe_load(path.read_text())
    if "space" in document:  # a sweep: its space's most expensive point too
        sweeps.validate_sweep(SweepSpec.model_validate(document), settings_for_limits)
    else:
        limits.check_job_cost(spec=JobSpec.model_validate(document), settings=settings_for_limits)


# --------------------------------------------------------------------------- the running cap

CAP = 4
SWEEP = {"spec": {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"},
                  "meta_batch_size": 4, "iterations": 20},
         "space": {"algorithm.inner_lr": {"grid": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]}}}


@pytest.mark.dialects
def test_two_sweeps_of_one_user_never_run_above_the_running_cap(sessions, alice, db_url,
                                                                tmp_path):  # noqa: ANN001
    """Two dispatchers claim while each sweep's driver starts as many trials as it is allowed
    (its sweep_run's max_concurrent_trials), as the Tune driver does; a sampler counts the
    user's running job rows every 0.2 s. Before: both drivers were claimed at once and each
    ran cap − 1 trials (8 running against a cap of 4)."""
    settings = Settings(database_url=db_url, artifact_root=tmp_path / "a", dispatcher=False,
                        max_running_jobs_per_user=CAP)
    with sessions() as session:
        for index in range(2):
            sweeps.submit_sweep(session=session, owner=alice, settings=settings,
                                request=SweepSpec.model_validate({**SWEEP, "name": f"s{index}"}))
        session.commit()
    samples: list[int] = []
    stop, errors = threading.Event(), []

    def sample() -> None:
        while not stop.is_set():
            with sessions() as session:
                samples.append(session.scalar(select(func.count()).select_from(Job).where(
                    Job.owner_id == alice.id,
                    Job.status.in_([JobStatus.RUNNING.value, JobStatus.CANCELLING.value]))))
            time.sleep(0.2)

    def dispatcher(worker: str) -> None:
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with sessions() as session:
                    with session.begin():
                        job = claims.claim_next_job(session=session, worker_id=worker, lease_s=60,
                                                    max_running_per_user=CAP)
                    if job is None:
                        if session.scalar(select(func.count()).select_from(Job).where(
                                Job.status == JobStatus.QUEUED.value)) == 0:
                            return
                        time.sleep(0.05)
                        continue
                    run_driver(session, job, worker)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    def run_driver(session, job, worker: str) -> None:  # noqa: ANN001
        run = job_runs.job_run(session=session, job=job, settings=settings)
        session.commit()
        trials = run.sweep.config["trials"]
        assert run.sweep.max_concurrent_trials == CAP - 1
        spec = JobSpec.model_validate(run.sweep.config["spec"])
        for first in range(0, trials, run.sweep.max_concurrent_trials):
            batch = [f"{job.id[:20]}{worker[-1]}{first + i:05d}"
                     for i in range(min(run.sweep.max_concurrent_trials, trials - first))]
            with session.begin():
                for job_id in batch:
                    child_jobs.start_child_job(session=session, parent_job_id=job.id,
                                               worker_id=worker, job_id=job_id, key=job_id[-5:],
                                               name="trial", spec=spec)
            time.sleep(0.5)  # trials training: the sampler sees them running
            with session.begin():
                for job_id in batch:
                    child_jobs.end_child_job(session=session, parent_job_id=job.id,
                                             worker_id=worker, job_id=job_id,
                                             status=JobStatus.SUCCEEDED, message="finished")
        with session.begin():
            job_store.finish_job(session=session, job_id=job.id, worker_id=worker,
                                 status=JobStatus.SUCCEEDED)

    sampler = threading.Thread(target=sample)
    workers = [threading.Thread(target=dispatcher, args=(f"w{i}",)) for i in range(2)]
    sampler.start()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(180)
    stop.set()
    sampler.join()
    assert not errors, errors
    with sessions() as session:
        statuses = session.scalars(select(Job.status).where(Job.sweep_id.is_(None))).all()
    assert statuses == [JobStatus.SUCCEEDED.value] * 2  # both sweeps ran to the end
    assert max(samples) <= CAP, samples
    assert max(samples) == CAP  # and used the cap: the drivers' trials ran


def test_the_largest_values_are_those_tune_can_draw():
    from metaserve.workers.sweep_spec import largest_values

    assert largest_values("randint", [1, 4097]) == [4096]  # high exclusive
    assert largest_values("qrandint", [1000, 4096, 1000]) == [4000]  # rounded as Tune does
    assert largest_values("uniform", [0.1, 0.5]) == [0.5]
    assert largest_values("choice", [8, 64, 16]) == [64]
    assert largest_values("grid", [True, False, True]) == [True, False]
    assert largest_values("choice", [[8], [64], [8]]) == [[8], [64]]


def test_a_sweeps_total_work_counts_against_its_own_cap(tmp_path: Path):
    # 8 trials, each within the per-job cap, together over the sweep's.
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'unused.db'}", dispatcher=False,
                        max_job_pflop=1.0, sweep_max_pflop=1.5)
    spec = {"algorithm": {"name": "maml"}, "task_family": {"name": "glyphs"}, "iterations": 3000}
    trial_work = limits.check_job_cost(spec=JobSpec.model_validate(spec),
                                       settings=settings).work_flop
    assert 1.5e15 / 8 < trial_work <= 1e15
    body = {"spec": spec, "space": {"algorithm.inner_lr": {"uniform": [0.01, 0.1]}},
            "num_samples": 8}
    with pytest.raises(InvalidSweep) as refused:
        sweeps.validate_sweep(SweepSpec.model_validate(body), settings)
    assert "METASERVE_SWEEP_MAX_PFLOP" in refused.value.details["num_samples"]
    body["num_samples"] = 1
    assert sweeps.validate_sweep(SweepSpec.model_validate(body), settings)[0]["trials"] == 1


def test_a_meta_rl_trial_over_the_caps_fails_before_it_trains(tmp_path: Path,
                                                              settings_for_limits: Settings):
    """The driver's check of each sampled trial (the sweep was admitted under other caps, or
    a sample the submit check could not foresee): TrialOverLimits naming the field, and the
    trainer never called."""
    from metaserve.workers.exceptions import TrialOverLimits
    from metaserve.workers.job_run import SweepRun
    from metaserve.workers.sweep import _train_trial

    spec = JobSpec.model_validate(RL_REPROS["rl2"][0])
    run = SweepRun(sweep_id="sw_x", name="x", config={}, limits=limits.cost_limits(
        settings_for_limits))
    trained = []
    with pytest.raises(TrialOverLimits, match="meta_batch_size: .*METASERVE_MAX_WORKER_MEMORY_MB"):
        _train_trial(spec, "job", tmp_path, "val/rl2_trial_return", run, None,
                     lambda *args: trained.append(args), lambda *args: None, 1)
    assert trained == []
