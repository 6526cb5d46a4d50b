"""Chaos: run jobs through a real ``metaserve serve`` while killing inner-loop workers and
the server itself at random moments, then count what became of every accepted job (issue 6).

    python benchmarks/chaos.py [--jobs 20] [--chaos-s 120] [--deadline-s 600] [--seed 0]
                               [--json out.json]

The server runs on its embedded default (SQLite, dispatcher inside, its own local Ray) in a
fresh directory. A submitter thread posts ``--jobs`` small sine MAML jobs, one every half
second, each with its own Idempotency-Key, retrying a job (same key) until it gets a 201 or
200, so a submit that meets a dead server is not lost to the client either. For
``--chaos-s`` seconds, every 2–6 s (uniform, ``--seed``), one of:

* kill an inner-loop worker (3 in 4 of events): SIGKILL of one process of this server's
  Ray whose title names ``InnerLoopWorker`` (an actor of a running job), picked at random;
  when none exists yet (a job's actors are still starting, or every job is between
  attempts) the event waits up to 15 s for one, so a kill lands instead of being skipped;
* kill the server (1 in 4): SIGKILL of its whole process group (server, dispatcher, local
  Ray), then a restart on the same port and directory.

Only processes of the server's own session are candidates (``ps -o sid``): other Ray
instances on the machine are never touched.

After that the server is left alone until every accepted job is terminal or
``--deadline-s`` passes. Reported: jobs accepted (a 201 was received), succeeded, failed,
cancelled, lost (accepted but unknown to the server: must be 0), unfinished at the deadline
(still queued or running: not lost, the machine was too slow to finish them), extra attempts
(sum of ``attempt - 1``), and the events applied.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.server_process import ServerProcess  # noqa: E402

JOB_SPEC = {
    "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
    "task_family": {"name": "sine"},
    "iterations": 150, "meta_batch_size": 10, "log_every": 10, "checkpoint_every": 25,
    "evaluation": {"every": 50, "tasks": 20, "inner_steps": [1]},
    "max_attempts": 10,
}
TERMINAL = {"succeeded", "failed", "cancelled"}


WORKER_WAIT_S = 15.0
SERVER_KILL_SHARE = 0.25


def inner_loop_worker_pids(session_id: int) -> list[int]:
    """Processes of session ``session_id`` (the server's: it starts its own Ray) running an
    inner-loop worker actor (Ray titles them ``ray::InnerLoopWorker...``)."""
    listing = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True)
    pids = []
    for line in listing.stdout.splitlines():
        pid, sid, args = line.split(None, 2) if len(line.split(None, 2)) == 3 else (0, 0, "")
        if int(sid) == session_id and "InnerLoopWorker" in args:
            pids.append(int(pid))
    return pids


class Chaos:
    def __init__(self, directory: Path, jobs: int, seed: int) -> None:
        self.directory, self.jobs = directory, jobs
        self.random = random.Random(seed)
        self.server = ServerProcess(directory).start()
        self.accepted: dict[str, str] = {}  # Idempotency-Key → job id
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.restarting = threading.Event()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=10,
                            headers={"Authorization": f"Bearer {self.server.admin_key}"})

    def submit_all(self) -> None:
        for index in range(self.jobs):
            key = f"chaos-{index}"
            spec = {**JOB_SPEC, "seed": index}
            while True:
                try:
                    with self.client() as client:
                        response = client.post("/v1/jobs", json=spec,
                                               headers={"Idempotency-Key": key})
                    if response.status_code in (200, 201):
                        with self.lock:
                            self.accepted[key] = response.json()["id"]
                        break
                    raise RuntimeError(f"submit {key}: {response.status_code} {response.text}")
                except httpx.TransportError:
                    time.sleep(0.5)  # the server is down: retry with the same key
            time.sleep(0.5)

    def kill_worker(self) -> None:
        deadline = time.monotonic() + WORKER_WAIT_S
        while not (pids := inner_loop_worker_pids(self.server.process.pid)):
            if time.monotonic() > deadline:
                self.events.append({"t": self.elapsed(), "event": "no worker to kill"})
                return
            time.sleep(0.2)
        pid = self.random.choice(pids)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.events.append({"t": self.elapsed(), "event": "killed inner-loop worker",
                            "pid": pid})

    def kill_server(self) -> None:
        session_id = self.server.process.pid
        self.server.kill()
        for pid in inner_loop_worker_pids(session_id):  # a machine loss takes these too
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.events.append({"t": self.elapsed(), "event": "killed server"})
        self.server = ServerProcess(self.directory, port=self.server.port).start()
        self.events.append({"t": self.elapsed(), "event": "restarted server"})

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def run(self, chaos_s: float, deadline_s: float) -> dict:
        self.started = time.monotonic()
        submitter = threading.Thread(target=self.submit_all, daemon=True)
        submitter.start()
        while time.monotonic() - self.started < chaos_s:
            time.sleep(self.random.uniform(2.0, 6.0))
            if self.random.random() >= SERVER_KILL_SHARE:
                self.kill_worker()
            else:
                self.kill_server()
        submitter.join()
        jobs = self.wait_terminal(deadline_s)
        self.server.terminate()
        statuses = [job["status"] for job in jobs.values() if job]
        return {
            "jobs_submitted": self.jobs,
            "accepted": len(self.accepted),
            "succeeded": statuses.count("succeeded"),
            "failed": statuses.count("failed"),
            "cancelled": statuses.count("cancelled"),
            "lost": sum(1 for job in jobs.values() if not job),
            "unfinished_at_deadline": sum(1 for job in jobs.values()
                                          if job and job["status"] not in TERMINAL),
            "extra_attempts": sum(max(0, job["attempt"] - 1) for job in jobs.values() if job),
            "worker_kills": sum(e["event"] == "killed inner-loop worker" for e in self.events),
            "server_kills": sum(e["event"] == "killed server" for e in self.events),
            "errors": sorted({job["error"] for job in jobs.values() if job and job["error"]
                              and job["status"] == "failed"}),
            "wall_s": self.elapsed(),
            "events": self.events,
        }

    def wait_terminal(self, deadline_s: float) -> dict[str, dict | None]:
        deadline = time.monotonic() + deadline_s
        jobs: dict[str, dict | None] = {}
        while True:
            with self.client() as client:
                for job_id in self.accepted.values():
                    response = client.get(f"/v1/jobs/{job_id}")
                    jobs[job_id] = response.json() if response.status_code == 200 else None
            if all(job and job["status"] in TERMINAL for job in jobs.values()) or \
                    time.monotonic() > deadline:
                return jobs
            time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--chaos-s", type=float, default=120.0)
    parser.add_argument("--deadline-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="metaserve-chaos-") as directory:
        report = Chaos(Path(directory), args.jobs, args.seed).run(args.chaos_s, args.deadline_s)
    summary = {key: value for key, value in report.items() if key != "events"}
    print(json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if report["lost"]:
        raise SystemExit(f"{report['lost']} accepted jobs lost")


if __name__ == "__main__":
    main()
