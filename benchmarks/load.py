"""Load: status-poll latency and submit rate of a real ``metaserve serve`` (issue 6).

    python benchmarks/load.py [--db sqlite|postgres|both] [--clients 50] [--seconds 20]
                              [--json out.json]

Tool: wrk (C, one thread, Debian package ``wrk``), driven by Lua scripts this file writes,
on the same 2 cores as the server. wrk costs far less CPU per request than a Python client,
so what is measured is the server, not the load generator.

The server runs on its default settings (one uvicorn process, dispatcher on with the local
Ray it starts) in a fresh directory, on a fresh SQLite file or a fresh PostgreSQL database
(``METASERVE_TEST_DATABASE_URL``'s server, default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). The measurement starts once Ray is up
(``/readyz`` says ``dispatcher: ready``) and the server has settled.

submit: ``--clients`` connections POST /v1/jobs back to back for ``--seconds`` (the two-line
  spec, each request its own Idempotency-Key); rate = 2xx responses / wall time, checked
  against the jobs the database holds. The dispatcher starts running the first of those
  jobs meanwhile (default settings); afterwards every job is cancelled through the API and
  the poll phases wait until none is running.
poll: ``--clients`` connections each GET /v1/jobs/{id} of a job, one poll every 0.25–0.75 s
  (uniformly random, mean 0.5 s, so clients do not march in step: an open load of
  ``clients`` × 2 polls/s, as clients waiting for their jobs poll); then back to back
  (a closed loop: the saturated throughput; latency is then clients / throughput).
Latency is wrk's: from writing the request to the last byte of the response.
Targets: p99 ≤ 25 ms for polls, ≥ 200 submits/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
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
SETTLE_S = 10.0

# wrk calls done() once with the merged latency histogram (microseconds); print it as JSON.
REPORT_LUA = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""

POLL_LUA = """
wrk.method = "GET"
wrk.path = os.getenv("POLL_PATH")
wrk.headers["Authorization"] = "Bearer " .. os.getenv("API_KEY")
local interval_ms = tonumber(os.getenv("INTERVAL_MS"))
function delay()
  if interval_ms > 0 then
    return math.random(math.floor(interval_ms / 2), math.floor(interval_ms * 3 / 2))
  end
  return 0
end
""" + REPORT_LUA

SUBMIT_LUA = """
local counter = 0
local prefix = os.getenv("RUN_ID")
wrk.method = "POST"
wrk.path = "/v1/jobs"
wrk.body = os.getenv("SPEC_JSON")
wrk.headers["Authorization"] = "Bearer " .. os.getenv("API_KEY")
wrk.headers["Content-Type"] = "application/json"
function request()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = "load-" .. prefix .. "-" .. counter
  return wrk.format()
end
""" + REPORT_LUA


def machine() -> str:
    from machine import cpu_model  # noqa: PLC0415 (benchmarks/, beside this script)

    cpu = cpu_model()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def wrk_version() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    output = subprocess.run([found, "-v"], capture_output=True, text=True)
    return (output.stdout + output.stderr).strip().splitlines()[0]


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


def run_wrk(script: str, url: str, clients: int, seconds: float, env: dict[str, str],
            directory: Path) -> dict:
    path = directory / f"script-{uuid.uuid4().hex[:8]}.lua"
    path.write_text(script)
    completed = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(path),
         url], capture_output=True, text=True, env={**os.environ, **env}, check=True)
    line = next(line for line in completed.stdout.splitlines() if line.startswith("WRK_JSON "))
    raw = json.loads(line.removeprefix("WRK_JSON "))
    seconds_ = raw["duration_us"] / 1e6
    return {"requests": raw["requests"], "errors": raw["errors"],
            "per_s": round(raw["requests"] / seconds_, 1),
            **{f"{name}_ms": round(raw[f"{name}_us"] / 1000, 2)
               for name in ("p50", "p90", "p99", "max", "mean")}}


def wait_until(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.5)


def measure(directory: Path, database_url: str, clients: int, seconds: float,
            database: str, server_code: Path | None = None) -> dict:
    extra = {"PYTHONPATH": str(server_code)} if server_code else {}
    server = ServerProcess(directory, METASERVE_DATABASE_URL=database_url, **extra).start()
    try:
        client = server.client()
        if server_code is None:
            wait_until(lambda: client.get("/readyz").json().get("dispatcher") == "ready", 180,
                       "the dispatcher to connect to Ray")
        time.sleep(SETTLE_S if server_code is None else 3 * SETTLE_S)  # older /readyz: no state
        env = {"API_KEY": server.admin_key, "RUN_ID": uuid.uuid4().hex[:8],
               "SPEC_JSON": json.dumps(TWO_LINE_SPEC)}
        submit = run_wrk(SUBMIT_LUA, server.url, clients, seconds, env, directory)
        ids = job_ids(client)
        submit["jobs_stored"] = len(ids)
        submit["per_s"] = round((submit["requests"] - submit["errors"]["status"]) / seconds, 1)
        for job_id in ids:
            client.post(f"/v1/jobs/{job_id}/cancel")
        wait_until(lambda: not client.get("/v1/jobs", params={"status": "running"}).json()[
            "data"] and not client.get("/v1/jobs", params={"status": "cancelling"}).json()[
            "data"], 120, "the cancelled jobs to stop")
        time.sleep(SETTLE_S)
        poll_env = {**env, "POLL_PATH": f"/v1/jobs/{ids[0]}"}
        polls = {
            "every 0.25-0.75 s": run_wrk(POLL_LUA, server.url, clients, seconds,
                                         {**poll_env, "INTERVAL_MS": "500"}, directory),
            "back to back": run_wrk(POLL_LUA, server.url, clients, min(seconds, 10.0),
                                    {**poll_env, "INTERVAL_MS": "0"}, directory),
        }
    finally:
        server.terminate()
    return {"database": database, "clients": clients, "seconds": seconds,
            "submit": submit, "poll": polls,
            "submit_target_met": submit["per_s"] >= SUBMIT_TARGET_PER_S,
            "poll_p99_target_met": polls["every 0.25-0.75 s"]["p99_ms"] <= P99_TARGET_MS}


def job_ids(client: httpx.Client) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        page = client.get("/v1/jobs", params={"limit": 100, **(
            {"cursor": cursor} if cursor else {})}).json()
        ids.extend(job["id"] for job in page["data"])
        cursor = page["next_cursor"]
        if not cursor:
            return ids


def run(database: str, clients: int, seconds: float, server_code: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="metaserve-load-") as directory:
        if database == "postgres":
            with fresh_postgres() as url:
                return measure(Path(directory), url, clients, seconds, database, server_code)
        url = f"sqlite:///{directory}/.metaserve/metaserve.db"
        return measure(Path(directory), url, clients, seconds, database, server_code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="Length of the submit phase and of the open-loop poll phase.")
    parser.add_argument("--json", type=Path, help="Also write the report here.")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="Also measure the server code of another checkout of this "
                             "repository (e.g. a `git worktree` of an older commit), right "
                             "after each measurement of this one: the peer in the same run.")
    args = parser.parse_args()
    report = {"tool": f"{wrk_version()}, 1 thread, {args.clients} connections, Lua scripts "
                      "in benchmarks/load.py, same machine as the server",
              "machine": machine(), "load_average_before": os.getloadavg(), "results": []}
    print(json.dumps({k: v for k, v in report.items() if k != "results"}), flush=True)
    for database in (["sqlite", "postgres"] if args.db == "both" else [args.db]):
        result = run(database, args.clients, args.seconds)
        result["load_average_after"] = os.getloadavg()
        report["results"].append(result)
        print(json.dumps(result), flush=True)
        if args.baseline:
            baseline = run(database, args.clients, args.seconds, args.baseline.resolve())
            baseline["server_code"] = str(args.baseline)
            baseline["load_average_after"] = os.getloadavg()
            report["results"].append(baseline)
            print(json.dumps(baseline), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
