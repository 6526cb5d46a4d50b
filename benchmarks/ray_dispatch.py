"""Benchmarks of running jobs through the service on Ray (issue: Run jobs on Ray).

    python benchmarks/ray_dispatch.py overhead  [--iterations 2000]
    python benchmarks/ray_dispatch.py scaling   [--scaling-iterations 6]
    python benchmarks/ray_dispatch.py latency   [--jobs 10]
    python benchmarks/ray_dispatch.py all --json out.json

overhead: the sine MAML configuration of the engine benchmark (MLP 1-40-40-1, meta-batch 25,
  10/10 shots, second order, 1 inner step, torch threads = 1) for N iterations with 1 worker,
  submitted to a real ``metaserve serve`` (embedded default: SQLite, its own local Ray), against
  the in-process engine (``Trainer.step``) in this process, same machine, same run. The
  service's figure is the job's own tasks/s (training loop only, from its progress record) and
  also the end-to-end rate from ``started_at`` to ``finished_at``. Between the two, the same
  segments through a bare inner-loop actor (a local Ray, no server): what Ray itself costs.
scaling: conv4 5-way 1-shot (15 query) on the built-in glyphs family, meta-batch 32, one torch
  thread per worker, 1 and then 2 inner-loop workers on a local Ray with 2 CPUs (runner only).
latency: queued → running with Ray already up: ``started_at - created_at`` of jobs submitted
  one after another to a running server whose dispatcher is idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTLE_S = 8.0

SINE_SPEC = {
    "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
    "task_family": {"name": "sine", "support_shots": 10, "query_shots": 10},
    "model": {"name": "mlp", "hidden": [40, 40]},
    "meta_batch_size": 25,
    "log_every": 100,
    "checkpoint_every": 1000,
    "evaluation": {"every": 0, "tasks": 100, "inner_steps": [1]},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}

CONV4_SPEC = {
    "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1},
    "task_family": {"name": "glyphs", "ways": 5, "support_shots": 1, "query_shots": 15},
    "model": {"name": "conv4", "filters": 64},
    "meta_batch_size": 32,
    "log_every": 1,
    "checkpoint_every": 1000,
    "evaluation": {"every": 0, "tasks": 32, "inner_steps": [1]},
}


def _machine() -> dict:
    from machine import cpu_model  # noqa: PLC0415 (benchmarks/, beside this script)

    cpu = cpu_model()
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def in_process_tasks_per_s(spec: dict, iterations: int) -> float:
    import torch

    from metaserve.workers.engine import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(spec)
    state = trainer.init_state()
    for _ in range(20):  # warm-up
        state, _ = trainer.step(state)
    start = time.perf_counter()
    for _ in range(iterations):
        state, _ = trainer.step(state)
    return iterations * spec["meta_batch_size"] / (time.perf_counter() - start)


def bare_actor_rounds(spec: dict, iterations: int, rounds: int) -> dict:
    """The job's training loop through one inner-loop worker on a local Ray of this process,
    no server, the actor started as the runner starts it: segments of ``log_every`` iterations
    (``run_segment``, as the runner sends them with one worker), timed at the caller and
    inside the actor, each round followed by the loop in-process. Separates what Ray costs
    (the round trip per segment, the worker process) from what the server around it costs."""
    import ray

    from metaserve.workers.engine import Trainer
    from metaserve.workers.engine.loop import RunHooks
    from metaserve.workers.runner import _WorkerPool
    from metaserve.workers.spec import JobSpec

    job_spec = JobSpec.model_validate(spec)
    segment, batch = job_spec.log_every, job_spec.meta_batch_size
    segments = iterations // segment

    def timed_segment(worker, state, count):  # noqa: ANN001 - runs in the actor
        began = time.perf_counter()
        out = worker.run_segment(state, count)
        return out, time.perf_counter() - began

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    actor_rounds, local, loads = [], [], []
    try:
        pool = _WorkerPool(job_spec, RunHooks())  # the runner's own actor and its options
        pool.start(1)
        actor = pool.actors[0]
        first = Trainer(job_spec.model_dump(mode="json")).init_state()
        ray.get(actor.__ray_call__.remote(timed_segment, first, 20))  # warm-up
        for _ in range(rounds):
            loads.append(round(os.getloadavg()[0], 2))
            state, inside = first, 0.0
            start = time.perf_counter()
            for _ in range(segments):
                (state, _), seconds = ray.get(actor.__ray_call__.remote(timed_segment, state,
                                                                        segment))
                inside += seconds
            outside = time.perf_counter() - start
            tasks = segments * segment * batch
            actor_rounds.append({"tasks_per_s": round(tasks / outside, 1),
                                 "inside_actor_tasks_per_s": round(tasks / inside, 1),
                                 "round_trip_ms_per_segment":
                                     round((outside - inside) / segments * 1000, 1)})
            actor_rounds[-1]["runner_wall_tasks_per_s"] = runner_wall_tasks_per_s(spec)
            local.append(round(in_process_tasks_per_s(spec, iterations), 1))
            print(f"bare actor {actor_rounds[-1]}, in-process {local[-1]} tasks/s "
                  f"(load {loads[-1]})", flush=True)
        pool.shutdown()
    finally:
        ray.shutdown()
    best = max(actor_rounds, key=lambda round_: round_["tasks_per_s"])
    best_runner = max(round_["runner_wall_tasks_per_s"] for round_ in actor_rounds)
    return {"rounds": {"actor": actor_rounds, "in_process_tasks_per_s": local, "load_1m": loads},
            **best, "in_process_tasks_per_s": max(local),
            "ratio": round(best["tasks_per_s"] / max(local), 3),
            "runner_wall_tasks_per_s": best_runner,
            "runner_wall_ratio": round(best_runner / max(local), 3)}


def runner_wall_tasks_per_s(spec: dict) -> float:
    """The job run by the runner itself (``run_job``, the Ray driver and its worker, no
    server) timed by the wall clock from its first progress record to its last: the training
    loop with everything between segments (logging, checkpoints), without the worker's start
    and the final evaluation. (The job's ``tasks_per_s`` counts only the time the loop waits
    for segments, which no longer includes what overlaps the worker's next segment.)"""
    from metaserve.workers.engine.loop import RunHooks
    from metaserve.workers.registry import run_job
    from metaserve.workers.spec import JobSpec

    marks: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as directory:
        run_job(JobSpec.model_validate(spec), Path(directory), RunHooks(progress=lambda progress: marks.append(
            (time.perf_counter(), progress["iteration"]))))
    (first_time, first_iteration), (last_time, last_iteration) = marks[0], marks[-1]
    return round((last_iteration - first_iteration) * spec["meta_batch_size"]
                 / (last_time - first_time), 1)


def _wait(client, job_id: str, timeout: float = 3600) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(0.5)
    raise TimeoutError(job_id)


def overhead(iterations: int, rounds: int = 3) -> dict:
    """``rounds`` rounds of (the loop in-process, the job through the server) while one
    server stays up, then ``rounds`` of (a bare actor, in-process) on a local Ray: the
    machine is shared and its load moves within minutes, so each ratio is of the best round
    of each side, and every round's figures and load are kept."""
    from tests.server_process import ServerProcess

    spec = {**SINE_SPEC, "iterations": iterations}
    local_iterations = min(iterations, 1000)
    service, local, loads = [], [], []
    with tempfile.TemporaryDirectory() as directory:
        server = ServerProcess(Path(directory)).start()
        try:
            with server.client() as client:
                # warm the server's Ray (actor start-up is not what this measures)
                _wait(client, client.post("/v1/jobs", json={**spec, "iterations": 20}).json()["id"])
                for _ in range(rounds):
                    # after a job the server's Ray replaces its workers (process start-ups,
                    # imports) for a few seconds: let that pass before timing in-process
                    time.sleep(SETTLE_S)
                    loads.append(round(os.getloadavg()[0], 2))
                    local.append(round(in_process_tasks_per_s(spec, local_iterations), 1))
                    job = _wait(client, client.post("/v1/jobs", json=spec).json()["id"])
                    assert job["status"] == "succeeded", job
                    seconds = (_parse_time(job["finished_at"])
                               - _parse_time(job["started_at"])).total_seconds()
                    service.append({"tasks_per_s": job["progress"]["tasks_per_s"],
                                    "end_to_end_tasks_per_s": round(iterations * 25 / seconds, 1)})
                    print(f"service {service[-1]}, in-process {local[-1]} tasks/s "
                          f"(load {loads[-1]})", flush=True)
        finally:
            server.terminate()
    bare = bare_actor_rounds(spec, local_iterations, rounds)
    best_local = max(local)
    best_service = max(round_["tasks_per_s"] for round_ in service)
    best_end_to_end = max(round_["end_to_end_tasks_per_s"] for round_ in service)
    return {
        "iterations": iterations,
        "rounds": {"service": service, "in_process_tasks_per_s": local, "load_1m": loads},
        "in_process_tasks_per_s": best_local,
        "service_tasks_per_s": best_service,
        "service_end_to_end_tasks_per_s": best_end_to_end,
        "ratio": round(best_service / best_local, 3),
        "ratio_end_to_end": round(best_end_to_end / best_local, 3),
        "bare_actor": bare,
    }


def scaling(iterations: int) -> dict:
    import ray

    from metaserve.workers.engine.loop import RunHooks
    from metaserve.workers.registry import run_job
    from metaserve.workers.spec import JobSpec

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results, loads = {}, []
    try:
        for workers in (1, 2, 1, 2):  # interleaved: the machine is shared and noisy
            spec = {**CONV4_SPEC, "iterations": iterations,
                    "resources": {"workers": workers, "cpus_per_worker": 1}}
            progress: list[dict] = []
            with tempfile.TemporaryDirectory() as directory:
                run_job(JobSpec.model_validate(spec), Path(directory),
                        RunHooks(progress=progress.append))
            rate = progress[-1]["tasks_per_s"]
            results.setdefault(workers, []).append(rate)
            loads.append(round(os.getloadavg()[0], 2))
            print(f"workers={workers}: {rate} tasks/s (load {loads[-1]})", flush=True)
    finally:
        ray.shutdown()
    best = {workers: max(rates) for workers, rates in results.items()}
    return {"iterations": iterations, "tasks_per_s": results, "load_1m_after_each_round": loads,
            "best_1_worker": best[1], "best_2_workers": best[2],
            "speedup": round(best[2] / best[1], 3)}


def latency(jobs: int) -> dict:
    from tests.server_process import ServerProcess

    spec = {**SINE_SPEC, "iterations": 20}
    delays = []
    with tempfile.TemporaryDirectory() as directory:
        server = ServerProcess(Path(directory)).start()
        try:
            with server.client() as client:
                _wait(client, client.post("/v1/jobs", json=spec).json()["id"])  # Ray up, warm
                for _ in range(jobs):
                    job = _wait(client, client.post("/v1/jobs", json=spec).json()["id"])
                    delays.append((_parse_time(job["started_at"])
                                   - _parse_time(job["created_at"])).total_seconds())
        finally:
            server.terminate()
    return {"jobs": jobs, "median_s": round(statistics.median(delays), 3),
            "max_s": round(max(delays), 3), "all_s": [round(d, 3) for d in delays]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["overhead", "scaling", "latency", "all"])
    parser.add_argument("--iterations", type=int, default=2000, help="overhead: iterations")
    parser.add_argument("--rounds", type=int, default=3, help="overhead: rounds of each side")
    parser.add_argument("--scaling-iterations", type=int, default=6, help="scaling: iterations")
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report: dict = {"machine": _machine()}
    if args.what in ("overhead", "all"):
        report["overhead"] = overhead(args.iterations, args.rounds)
        print(json.dumps(report["overhead"]), flush=True)
    if args.what in ("latency", "all"):
        report["latency"] = latency(args.jobs)
        print(json.dumps(report["latency"]), flush=True)
    if args.what in ("scaling", "all"):
        report["scaling"] = scaling(args.scaling_iterations)
        print(json.dumps(report["scaling"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
