"""/v1/sweeps without a dispatcher (SQLite and PostgreSQL): validation, ownership, idempotency,
cancel of a queued sweep, trials as jobs and the leaderboard."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from metaserve.service import sweeps
from metaserve.service.exceptions import LeaseLost
from metaserve.service.orm import Job, JobStatus, JobStatusEvent, Sweep
from metaserve.service.settings import Settings
from metaserve.workers.job_run import Trial
from metaserve.workers.spec import JobSpec

BASE = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}, "meta_batch_size": 4,
        "iterations": 20, "evaluation": {"every": 5, "tasks": 10, "inner_steps": [1]}}
SWEEP = {"name": "tiny", "spec": BASE,
         "space": {"algorithm.inner_lr": {"grid": [0.01, 0.1]},
                   "outer_optimizer.lr": {"loguniform": [0.0005, 0.005]}},
         "search": {"name": "random", "seed": 1},
         "scheduler": {"name": "asha", "metric": "val/loss_step1", "mode": "min"},
         "num_samples": 2}


RL2_BASE = {"algorithm": {"name": "rl2"}, "task_family": {"name": "bandit"}, "iterations": 20,
            "evaluation": {"every": 5}}


def with_(**changes) -> dict:  # noqa: ANN003
    return {**SWEEP, **changes}


def stored(sessions) -> tuple[int, int]:  # noqa: ANN001
    with sessions() as session:
        return (session.scalar(select(func.count()).select_from(Sweep)),
                session.scalar(select(func.count()).select_from(Job)))


def test_a_sweep_is_stored_with_its_queued_driver_job_and_defaults_filled_in(client, alice_auth,
                                                                             sessions):  # noqa: ANN001
    response = client.post("/v1/sweeps", json=with_(scheduler={"name": "asha"}), headers=alice_auth)
    assert response.status_code == 201, response.text
    sweep = response.json()
    assert sweep["id"].startswith("sw_") and sweep["status"] == "queued"
    assert response.headers["Location"] == f"/v1/sweeps/{sweep['id']}"
    assert sweep["config"]["trials"] == 4  # the grid's 2 values × num_samples 2
    assert sweep["config"]["scheduler"] == {"name": "asha", "metric": "val/loss_step1",
                                            "mode": "min", "grace_period": 5,
                                            "reduction_factor": 3.0, "min_samples_required": 3}
    assert (sweep["trials"], sweep["best"]) == ({}, None)
    driver = client.get(f"/v1/jobs/{sweep['driver_job_id']}", headers=alice_auth).json()
    assert (driver["status"], driver["name"], driver["sweep_id"]) == (
        "queued", "tiny (sweep driver)", None)
    assert client.get(f"/v1/sweeps/{sweep['id']}", headers=alice_auth).json() == sweep
    listed = client.get("/v1/sweeps", headers=alice_auth).json()
    assert [s["id"] for s in listed["data"]] == [sweep["id"]] and listed["next_cursor"] is None


def test_an_rl_sweep_ranks_its_trials_by_a_validation_return_maximized(client, alice_auth):  # noqa: ANN001
    response = client.post("/v1/sweeps", headers=alice_auth, json=with_(
        spec=RL2_BASE, space={"algorithm.lr": {"choice": [0.01, 0.03]}},
        scheduler={"name": "asha"}))
    assert response.status_code == 201, response.text
    scheduler = response.json()["config"]["scheduler"]
    assert (scheduler["metric"], scheduler["mode"], scheduler["grace_period"]) == (
        "val/rl2_trial_return", "max", 5)


BAD_SWEEPS = [
    (with_(space={"algorithm.no_such": {"choice": [1, 2]}}), "space.algorithm.no_such",
     "no such field"),
    (with_(space={"outer_optimizer.lr": {"uniform": [0.01, 0.001]}}), "space.outer_optimizer.lr",
     "low 0.01 is above high 0.001"),
    (with_(space={"algorithm.inner_steps": {"randint": [1, 1]}}), "space.algorithm.inner_steps",
     "is empty"),
    (with_(space={"algorithm.inner_lr": {"gaussian": [0, 1]}}), "space.algorithm.inner_lr",
     "unknown domain"),
    (with_(space={"algorithm.inner_lr": {"choice": [0.01, -1.0]}}), "space.algorithm.inner_lr",
     "algorithm.inner_lr=-1.0 gives an invalid spec"),
    (with_(space={"meta_batch_size": {"qrandint": [0, 8, 4]}}), "space.meta_batch_size",
     "meta_batch_size=0 gives an invalid spec"),
    (with_(space={"name": {"choice": ["a", "b"]}}), "space.name", "not swept"),
    (with_(space={"task_family": {"choice": [{"name": "images", "dataset": "ds_" + "0" * 26}]}}),
     "space.task_family", "task_family.dataset is not swept"),
    (with_(spec={**BASE, "task_family": {"name": "images", "dataset": "ds_" + "0" * 26}},
           space={"algorithm.inner_lr": {"choice": [0.1]}}, scheduler={"name": "fifo"}),
     "spec.task_family.dataset", "no dataset ds_" + "0" * 26 + " of yours"),
    (with_(num_samples=0), "num_samples", "greater than or equal to 1"),
    (with_(num_samples=200), "num_samples", "400 trials, more than the cap of 256"),
    (with_(scheduler={"name": "asha", "metric": "val/accuracy_step1"}), "scheduler.metric",
     "not reported by the spec's evaluation; one of val/loss_step1"),
    (with_(scheduler={"name": "asha", "metric": "val/loss_step1", "mode": "maximize"}),
     "scheduler.mode", "'min' or 'max'"),
    (with_(search={"name": "grid"}, space={"algorithm.inner_lr": {"grid": list(range(1, 17))},
                                           "meta_batch_size": {"choice": list(range(1, 18))}}),
     "space", "the grid has 272 points, more than the cap of 256"),
    (with_(search={"name": "grid"}), "space.outer_optimizer.lr", "choice or grid domains only"),
    (with_(spec={**BASE, "iterations": 0}), "spec.iterations", "greater than or equal to 1"),
    (with_(spec={**BASE, "evaluation": {"every": 0}}), "scheduler.name",
     "set spec.evaluation.every"),
    (with_(scheduler={"name": "asha", "grace_period": BASE["iterations"] + 1}),
     "scheduler.grace_period", f"longer than any trial ({BASE['iterations']} iterations)"),
    (with_(search={"name": "random", "shuffle": True}), "search", "shuffle orders a grid"),
    (with_(spec=RL2_BASE, space={"algorithm.lr": {"choice": [0.01, 0.03]}},
           scheduler={"name": "fifo", "metric": "val/loss_step1"}), "scheduler.metric",
     "not reported by the spec's evaluation; one of val/rl2_trial_return, "
     "val/rl2_greedy_trial_return"),
]


def test_bad_sweeps_are_a_422_naming_the_field_and_store_nothing(client, alice_auth,
                                                                 sessions):  # noqa: ANN001
    # One test over the cases: each is a request to the same app (an app per case would
    # cost more than the cases themselves).
    for body, field, words in BAD_SWEEPS:
        response = client.post("/v1/sweeps", json=body, headers=alice_auth)
        assert response.status_code == 422, (field, response.text)
        details = response.json()["error"]["details"]
        assert [d["field"] for d in details] == [field], (field, details)
        assert words in details[0]["message"], (field, details)
    assert stored(sessions) == (0, 0)


def test_optuna_search_is_accepted_when_installed(client, alice_auth):  # noqa: ANN001
    import optuna  # noqa: F401 - a dependency: fails, not skips, without it
    response = client.post("/v1/sweeps", json=with_(
        search={"name": "optuna"}, space={"outer_optimizer.lr": {"loguniform": [1e-4, 1e-2]}}),
        headers=alice_auth)
    assert response.status_code == 201, response.text
    assert response.json()["config"]["trials"] == 2


@pytest.mark.dialects
def test_idempotency_key_replays_the_same_sweep_and_refuses_another_body(client, alice_auth,
                                                                         sessions):  # noqa: ANN001
    headers = {**alice_auth, "Idempotency-Key": "sweep-1"}
    first = client.post("/v1/sweeps", json=SWEEP, headers=headers)
    again = client.post("/v1/sweeps", json=SWEEP, headers=headers)
    other = client.post("/v1/sweeps", json=with_(num_samples=3), headers=headers)
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 409)
    assert again.json()["id"] == first.json()["id"]
    assert stored(sessions) == (1, 1)


def test_another_users_sweep_is_not_found_and_cannot_be_cancelled(client, alice_auth,
                                                                  bob_auth):  # noqa: ANN001
    sweep = client.post("/v1/sweeps", json=SWEEP, headers=alice_auth).json()
    for method, path in (("get", ""), ("get", "/trials"), ("post", "/cancel")):
        response = getattr(client, method)(f"/v1/sweeps/{sweep['id']}{path}", headers=bob_auth)
        assert response.status_code == 404, (path, response.text)
    assert client.get("/v1/sweeps", headers=bob_auth).json()["data"] == []
    assert client.get(f"/v1/sweeps/{sweep['id']}", headers=alice_auth).json()["status"] == "queued"


def test_cancelling_a_queued_sweep_cancels_its_driver_at_once_and_a_second_cancel_is_409(
        client, alice_auth):  # noqa: ANN001
    sweep = client.post("/v1/sweeps", json=SWEEP, headers=alice_auth).json()
    cancelled = client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=alice_auth)
    assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
    assert client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=alice_auth).status_code == 409


def test_trials_are_jobs_of_the_sweep_ranked_on_the_leaderboard_and_never_claimed(
        client, alice_auth, sessions, db_url, tmp_path):  # noqa: ANN001
    from metaserve.service import child_jobs, claims, job_runs, job_store

    sweep = client.post("/v1/sweeps", json=SWEEP, headers=alice_auth).json()
    settings = Settings(database_url=db_url, artifact_root=tmp_path / "a")
    first, second = "0" * 25 + "1", "0" * 25 + "2"
    with sessions() as session:  # the dispatcher claims the driver, which reports two trials
        with session.begin():
            claimed = claims.claim_next_job(session=session, worker_id="w", lease_s=30)
        assert claimed.id == sweep["driver_job_id"]
        run = job_runs.job_run(session=session, job=claimed, settings=settings)
        assert (run.job_id, run.sweep.sweep_id, run.sweep.trials) == (claimed.id, sweep["id"], {})
        assert run.spec == JobSpec.model_validate(claimed.spec)
        assert run.memory_bytes >= settings.sweep_driver_memory_mb * 2**20
        # Trials count toward the owner's running jobs, the driver too: cap 4 → 3 trials.
        assert settings.max_running_jobs_per_user == 4 and run.sweep.max_concurrent_trials == 3
        uncapped = job_runs.job_run(session=session, job=claimed, settings=Settings(
            database_url=db_url, max_running_jobs_per_user=0))
        assert uncapped.sweep.max_concurrent_trials is None
        trial = run.spec.model_copy(update={"algorithm": run.spec.algorithm.model_copy(
            update={"inner_lr": 0.1})})
        session.commit()  # the reads' transaction
        with session.begin():
            for key, job_id in (("t0", first), ("t1", second)):
                child_jobs.start_child_job(session=session, parent_job_id=claimed.id, worker_id="w",
                                      job_id=job_id, key=key, name=f"tiny/{key}", spec=trial)
            with pytest.raises(LeaseLost):  # only the holder of the driver's lease
                child_jobs.start_child_job(session=session, parent_job_id=claimed.id,
                                      worker_id="other", job_id="0" * 25 + "3", key="t2",
                                      name="tiny/t2", spec=trial)
            job_store.add_metrics(session=session, job_id=first, rows=[(5, "val/loss_step1", 2.0),
                                                                    (20, "val/loss_step1", 0.5),
                                                                    (20, "test/loss_step1", 0.625)])
            job_store.add_metrics(session=session, job_id=second, rows=[(5, "val/loss_step1", 1.5)])
            job_store.add_artifact(session=session, job_id=first, name="meta_init.json", size=2,
                               sha256="0" * 64, media_type="application/json")
            child_jobs.end_child_job(session=session, parent_job_id=claimed.id, worker_id="w",
                                job_id=first, status=JobStatus.SUCCEEDED, message="finished")
            child_jobs.end_child_job(session=session, parent_job_id=claimed.id, worker_id="w",
                                job_id=second, status=JobStatus.CANCELLED,
                                message="stopped early by asha at iteration 5")
        with session.begin():
            assert claims.claim_next_job(session=session, worker_id="w2", lease_s=30) is None
        resumed = job_runs.job_run(session=session, job=claimed, settings=settings)
        # A resumed driver gets each recorded trial's held-out test value from its metrics.
        assert resumed.sweep.trials == {"t0": Trial(first, "succeeded", 0.5, 20, 0.625),
                                        "t1": Trial(second, "cancelled", 1.5, 5, None)}
    board = client.get(f"/v1/sweeps/{sweep['id']}/trials", headers=alice_auth).json()
    assert [(t["trial_id"], t["status"], t["value"], t["step"]) for t in board["data"]] == [
        ("t0", "succeeded", 0.5, 20), ("t1", "cancelled", 1.5, 5)]
    assert board["data"][0]["config"] == {"algorithm.inner_lr": 0.1, "outer_optimizer.lr": 0.001}
    assert board["sweep"]["trials"] == {"succeeded": 1, "cancelled": 1}
    assert board["sweep"]["best"]["job_id"] == "0" * 25 + "1"
    assert [(t["test_metric"], t["test_value"], t["test_note"]) for t in board["data"]] == [
        ("test/loss_step1", 0.625, None),
        ("test/loss_step1", None, "none: the trial ended before its final evaluation, the "
                                  "only one of test/loss_step1")]
    assert board["sweep"]["best"]["test_value"] == 0.625
    # A trial ASHA stopped ended with a result: its outcome says "stopped", not a cancel.
    assert [t["outcome"] for t in board["data"]] == ["succeeded", "stopped"]
    listed = client.get(f"/v1/jobs?sweep={sweep['id']}", headers=alice_auth).json()["data"]
    assert [(j["id"], j["sweep_id"], j["outcome"]) for j in listed] == [
        ("0" * 25 + "2", sweep["id"], "stopped"), ("0" * 25 + "1", sweep["id"], "succeeded")]
    folded = client.get("/v1/jobs", headers=alice_auth).json()  # trials under their driver
    assert [(j["id"], j["driver_of_sweep"], j["trial_count"]) for j in folded["data"]] == [
        (sweep["driver_job_id"], sweep["id"], 2)]
    artifacts = client.get(f"/v1/jobs/{'0' * 25 + '1'}/artifacts", headers=alice_auth).json()
    assert [a["name"] for a in artifacts["data"]] == ["meta_init.json"]


def test_a_driver_that_ends_ends_its_running_trials_with_it(client, alice_auth, sessions,
                                                            db_url):  # noqa: ANN001
    from metaserve.service import child_jobs, claims, job_store

    sweep = client.post("/v1/sweeps", json=SWEEP, headers=alice_auth).json()
    with sessions() as session:
        with session.begin():
            claimed = claims.claim_next_job(session=session, worker_id="w", lease_s=30)
        spec = job_store.job_spec(claimed)
        session.commit()
        with session.begin():
            child_jobs.start_child_job(session=session, parent_job_id=claimed.id, worker_id="w",
                                  job_id="0" * 25 + "1", key="t0", name="tiny/t0",
                                  spec=spec)
    cancelled = client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=alice_auth).json()
    assert (cancelled["status"], cancelled["trials"]) == ("cancelling", {"running": 1})
    with sessions.begin() as session:
        job_store.finish_job(session=session, job_id=claimed.id, worker_id="w",
                             status=JobStatus.CANCELLED)
    trial = client.get("/v1/jobs/" + "0" * 25 + "1", headers=alice_auth).json()
    assert (trial["status"], trial["message"]) == ("cancelled", "cancelled with its sweep")
    with sessions() as session:  # its history: each change recorded once
        assert list(session.scalars(select(JobStatusEvent.status).where(
            JobStatusEvent.job_id == trial["id"]).order_by(JobStatusEvent.id))) == [
            "running", "cancelled"]


def test_a_metric_without_a_val_prefix_gives_no_held_out_score_and_says_why(
        client, alice_auth, sessions):  # noqa: ANN001
    """Every metric a sweep accepts today is a val/ one; a stored sweep whose metric is not (a
    sweep of an older server, or a future metric) shows no test score, and the reason."""
    from metaserve.service import child_jobs, claims, job_store

    sweep = client.post("/v1/sweeps", json=SWEEP, headers=alice_auth).json()
    trial_id = "0" * 25 + "1"
    with sessions() as session:
        with session.begin():
            row = session.get(Sweep, sweep["id"])
            config = dict(row.config)
            row.config = {**config, "scheduler": {**config["scheduler"],
                                                  "metric": "train/loss_step1"}}
            claimed = claims.claim_next_job(session=session, worker_id="w", lease_s=30)
        spec = job_store.job_spec(claimed)
        session.commit()
        with session.begin():
            child_jobs.start_child_job(session=session, parent_job_id=claimed.id, worker_id="w",
                                       job_id=trial_id, key="t0", name="tiny/t0", spec=spec)
            job_store.add_metrics(session=session, job_id=trial_id, rows=[
                (20, "train/loss_step1", 0.5), (20, "val/loss_step1", 0.75),
                (20, "test/loss_step1", 0.625)])
            child_jobs.end_child_job(session=session, parent_job_id=claimed.id, worker_id="w",
                                     job_id=trial_id, status=JobStatus.SUCCEEDED,
                                     message="finished")
    board = client.get(f"/v1/sweeps/{sweep['id']}/trials", headers=alice_auth).json()
    reason = ("train/loss_step1 is not a validation (val/) metric, so it has no held-out test/ "
              "counterpart: no test score is reported")
    assert [(t["value"], t["test_metric"], t["test_value"], t["test_note"])
            for t in board["data"]] == [(0.5, None, None, reason)]
    best = board["sweep"]["best"]
    assert (best["job_id"], best["test_value"], best["test_note"]) == (trial_id, None, reason)
