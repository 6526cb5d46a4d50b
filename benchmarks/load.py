"""Load: status-poll latency and submit rate of a real ``metaserve serve`` (issue 6).

    python benchmarks/load.py [--db sqlite|postgres|both] [--submits 2000] [--polls 200]
                              [--clients 50] [--json out.json]

The server runs on its default settings (one uvicorn process, dispatcher on, so the local
Ray it starts is up but idle: nothing is claimed because every job is cancelled as soon as
the submit phase ends) in a fresh directory, on a fresh SQLite file or a fresh PostgreSQL
database (``METASERVE_TEST_DATABASE_URL``'s server, default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). The client is httpx's AsyncClient on
asyncio in this process: ``--clients`` concurrent tasks, each its own keep-alive connection.

submit: ``--submits`` POST /v1/jobs (the two-line spec, each with its own Idempotency-Key)
  from the concurrent clients; the rate is requests / wall time.
poll: each client polls GET /v1/jobs/{id} of its own job ``--polls`` times, back to back
  (``--interval 0``: a closed loop, which measures the server saturated: latency is then
  clients / throughput) or one poll every ``--interval`` seconds (an open loop, as a client
  waiting for its job polls; 50 clients at 0.5 s offer 100 polls/s); p50/p99 of the
  per-request latency (send to last byte, measured by the client).
Targets: p99 ≤ 25 ms for polls, ≥ 200 submits/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.server_process import ServerProcess  # noqa: E402

TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
P99_TARGET_MS = 25.0
SUBMIT_TARGET_PER_S = 200.0


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


@contextmanager
def fresh_postgres() -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server = make_url(os.environ.get("METASERVE_TEST_DATABASE_URL", DEFAULT_POSTGRES))
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    name = f"metaserve_load_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


async def submit_phase(url: str, key: str, submits: int, clients: int) -> tuple[float, list[str]]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(submits):
        queue.put_nowait(index)
    ids: list[str] = []
    statuses: dict[int, int] = {}

    async def client_task() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"}) as client:
            while True:
                try:
                    index = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                response = await client.post("/v1/jobs", json=TWO_LINE_SPEC,
                                             headers={"Idempotency-Key": f"load-{index}"})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 201:
                    ids.append(response.json()["id"])

    started = time.perf_counter()
    await asyncio.gather(*(client_task() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    if statuses != {201: submits}:
        raise RuntimeError(f"submits answered {statuses}")
    return submits / elapsed, ids


async def poll_phase(url: str, key: str, job_ids: list[str], polls: int,
                     clients: int, interval: float) -> dict:
    latencies: list[float] = []
    errors = 0

    async def client_task(job_id: str) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"}) as client:
            await client.get(f"/v1/jobs/{job_id}")  # connect outside the measurement
            await asyncio.sleep(random.uniform(0, interval))  # spread the clients' phases
            for _ in range(polls):
                started = time.perf_counter()
                response = await client.get(f"/v1/jobs/{job_id}")
                latency = time.perf_counter() - started
                latencies.append(latency * 1000)
                errors += response.status_code != 200
                if interval:
                    await asyncio.sleep(max(0.0, interval - latency))

    started = time.perf_counter()
    await asyncio.gather(*(client_task(job_ids[i % len(job_ids)]) for i in range(clients)))
    elapsed = time.perf_counter() - started
    return {"interval_s": interval, "requests": len(latencies), "errors": errors,
            "p50_ms": round(percentile(latencies, 0.50), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2),
            "max_ms": round(max(latencies), 2),
            "mean_ms": round(statistics.fmean(latencies), 2),
            "polls_per_s": round(len(latencies) / elapsed, 1)}


def run(database: str, submits: int, polls: int, clients: int, intervals: list[float]) -> dict:
    with tempfile.TemporaryDirectory(prefix="metaserve-load-") as directory:
        if database == "postgres":
            with fresh_postgres() as url:
                return measure(Path(directory), url, submits, polls, clients, intervals,
                               database)
        url = f"sqlite:///{directory}/.metaserve/metaserve.db"
        return measure(Path(directory), url, submits, polls, clients, intervals, database)


def measure(directory: Path, database_url: str, submits: int, polls: int, clients: int,
            intervals: list[float], database: str) -> dict:
    server = ServerProcess(directory, METASERVE_DATABASE_URL=database_url).start()
    try:
        key = server.admin_key
        submit_rate, ids = asyncio.run(submit_phase(server.url, key, submits, clients))
        with server.client() as client:  # nothing for the idle dispatcher to run
            for job_id in ids:
                client.post(f"/v1/jobs/{job_id}/cancel")
        polls_ = [asyncio.run(poll_phase(server.url, key, ids[:clients], polls, clients,
                                         interval)) for interval in intervals]
    finally:
        server.terminate()
    return {"database": database, "clients": clients, "submits": submits,
            "submits_per_s": round(submit_rate, 1), "poll": polls_,
            "submit_target_met": submit_rate >= SUBMIT_TARGET_PER_S,
            "p99_target_met": {str(p["interval_s"]): p["p99_ms"] <= P99_TARGET_MS
                               for p in polls_}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--submits", type=int, default=2000)
    parser.add_argument("--polls", type=int, default=200, help="Polls per client.")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--interval", type=float, action="append",
                        help="Seconds between one client's polls; 0: back to back. Repeat "
                             "for several runs (default: 0.5 and 0).")
    parser.add_argument("--json", type=Path, help="Also write the report here.")
    args = parser.parse_args()
    report = {"tool": f"httpx {httpx.__version__} AsyncClient on asyncio, {args.clients} "
                      "concurrent clients, same machine as the server",
              "machine": machine(), "results": []}
    for database in (["sqlite", "postgres"] if args.db == "both" else [args.db]):
        result = run(database, args.submits, args.polls, args.clients,
                     args.interval or [0.5, 0.0])
        report["results"].append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
