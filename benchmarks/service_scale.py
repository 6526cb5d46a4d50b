"""The service at scale: the API and the claim on an empty PostgreSQL, then on one holding
100,000 jobs and 10,000,000 metric rows, in one run.

    python benchmarks/service_scale.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres \
        [--jobs 100000 --metric-rows 10000000] [--json benchmarks/results/service_scale.json]

A database of its own is created (``metaserve_scale_<pid>``) and dropped at the end; a real
``metaserve serve`` (dispatcher off: the API alone) serves it on loopback. Each phase measures,
from ``--clients`` threads with a keep-alive connection each:

- submits/s: ``POST /v1/jobs`` (admin keys: no queued cap);
- poll: ``GET /v1/jobs/{id}`` of the caller's own jobs, p50/p99;
- list: ``GET /v1/jobs?limit=50`` of a user holding 1/100 of the jobs, first page and a page
  whose cursor lies deep in that user's history (the 90th percentile of its ids);
- metrics (full phase): pages of the API's default size (1,000 values) of the job holding
  1,000,000 points (4 series × 250,000 steps) at since_step 0, 25 %, 50 %, 99 %, with and
  without ``name``, from 4 clients at once and from one; and an ordinary user's own job;
- every figure: the 1-minute load average when it began and the server process's CPU per
  request (``/proc``), which the machine's other work does not inflate as much as latency;
- claims: 8 threads (8 dispatchers: a session each) claim queued jobs until none is left or
  ``--claims`` were made; claims/s and whether any job was claimed twice.

The fill is plain SQL (``generate_series``): 100 users, jobs with ids older than any ULID the
service makes, statuses 80 % succeeded / 10 % failed / 5 % cancelled / 5 % queued, one status
event each; metric rows: the 1M-point job, the rest spread 1,000 per job.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server_process import ServerProcess  # noqa: E402

USERS = 100
SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}, "iterations": 10}
BIG_JOB_SERIES = ("train/loss", "train/loss_before", "val/mse", "tasks_per_s")
BIG_JOB_STEPS = 250_000
PER_JOB_METRIC_ROWS = 1_000
CLAIMERS = 8


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_requests(url: str, key: str, paths: list[str], clients: int,
                   method: str = "GET", body: dict | None = None,
                   server_pid: int | None = None) -> dict:
    """Each path requested once, spread over ``clients`` threads; latency figures in ms, the
    1-minute load average when it began and, given the server's pid, the server process's
    CPU per request (ms): what a request costs whatever else the machine runs."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    chunks = [paths[i::clients] for i in range(clients)]

    def run(chunk: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            for path in chunk:
                began = time.perf_counter()
                response = http.request(method, path, json=body)
                elapsed = (time.perf_counter() - began) * 1000
                with lock:
                    latencies.append(elapsed)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    load = os.getloadavg()[0]
    cpu_before = process_cpu_s(server_pid) if server_pid else 0.0
    began = time.perf_counter()
    threads = [threading.Thread(target=run, args=(chunk,)) for chunk in chunks if chunk]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    result = {"requests": len(latencies), "per_s": round(len(latencies) / wall, 1),
              "p50_ms": round(percentile(latencies, 50), 2),
              "p99_ms": round(percentile(latencies, 99), 2), "statuses": statuses,
              "clients": clients, "load_1m": round(load, 2)}
    if server_pid:
        result["server_cpu_ms_per_request"] = round(
            (process_cpu_s(server_pid) - cpu_before) / len(latencies) * 1000, 2)
    return result


def make_users(url: str) -> list[tuple[int, str]]:
    """``USERS`` users (ids and keys); the first 20 admins (the submitters)."""
    from metaserve.service import auth
    from metaserve.service.db import make_engine, session_factory

    engine = make_engine(url)
    users = []
    with session_factory(engine)() as session:
        for index in range(USERS):
            user, key = auth.create_key(session=session, name=f"scale{index:03d}",
                                        is_admin=index < 20)
            session.commit()
            users.append((user.id, key))
    engine.dispose()
    return users


def fill(url: str, users: list[tuple[int, str]], jobs: int, metric_rows: int) -> dict:
    """The history: ``jobs`` jobs and ``metric_rows`` metric rows, by SQL."""
    user_ids = [user_id for user_id, _ in users]
    began = time.perf_counter()
    engine = create_engine(url)
    spec = json.dumps(SPEC)
    with engine.begin() as connection:
        connection.execute(text("""
            INSERT INTO jobs (id, owner_id, name, spec, spec_hash, status, attempt, max_attempts,
                              progress, created_at, updated_at)
            SELECT lpad(to_hex(n), 26, '0'), (:ids)[1 + n % :users], 'history-' || n,
                   CAST(:spec AS JSON), md5(n::text),
                   CASE WHEN n % 20 < 16 THEN 'succeeded' WHEN n % 20 < 18 THEN 'failed'
                        WHEN n % 20 = 18 THEN 'cancelled' ELSE 'queued' END,
                   CASE WHEN n % 20 = 19 THEN 0 ELSE 1 END, 3, CAST('{}' AS JSON),
                   now() - make_interval(secs => :jobs - n), now() - make_interval(secs => :jobs - n)
            FROM generate_series(1, :jobs) AS n"""),
            {"ids": user_ids, "users": len(user_ids), "spec": spec, "jobs": jobs})
        connection.execute(text("""
            INSERT INTO job_status_events (job_id, status, attempt, created_at)
            SELECT id, status, attempt, created_at FROM jobs WHERE id LIKE '0000%'"""))
        big_job = f"{1:026x}"  # the first history job: status succeeded
        big_rows = min(metric_rows, len(BIG_JOB_SERIES) * BIG_JOB_STEPS)
        steps = big_rows // len(BIG_JOB_SERIES)
        connection.execute(text("""
            INSERT INTO metrics (job_id, step, name, value, created_at)
            SELECT :job, s, (CAST(:names AS text[]))[1 + k], random(), now()
            FROM generate_series(1, :steps) AS s, generate_series(0, :names_count - 1) AS k"""),
            {"job": big_job, "names": list(BIG_JOB_SERIES), "names_count": len(BIG_JOB_SERIES),
             "steps": steps})
        rest = metric_rows - big_rows
        spread_jobs = rest // PER_JOB_METRIC_ROWS
        per_series = PER_JOB_METRIC_ROWS // len(BIG_JOB_SERIES)
        connection.execute(text("""
            INSERT INTO metrics (job_id, step, name, value, created_at)
            SELECT lpad(to_hex(j), 26, '0'), s, (CAST(:names AS text[]))[1 + k], random(), now()
            FROM generate_series(2, :last_job) AS j, generate_series(1, :per_series) AS s,
                 generate_series(0, :names_count - 1) AS k"""),
            {"last_job": spread_jobs + 1, "per_series": per_series, "names": list(BIG_JOB_SERIES),
             "names_count": len(BIG_JOB_SERIES)})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))
        counts = {table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar()
                  for table in ("jobs", "metrics")}
    engine.dispose()
    return {"seconds": round(time.perf_counter() - began, 1), "rows": counts,
            "big_job": big_job, "big_job_steps": steps}


def owned_job_ids(url: str, owner_id: int, limit: int) -> list[str]:
    engine = create_engine(url)
    with engine.connect() as connection:
        ids = [row[0] for row in connection.execute(text(
            "SELECT id FROM jobs WHERE owner_id = :owner ORDER BY id DESC LIMIT :limit"),
            {"owner": owner_id, "limit": limit})]
    engine.dispose()
    return ids


def claims(url: str, limit: int) -> dict:
    """``CLAIMERS`` threads, a session each, claiming until no job is left or ``limit``."""
    from metaserve.service.claims import claim_next_job
    from metaserve.service.db import make_engine, session_factory

    engine = make_engine(url)
    sessions = session_factory(engine)
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(index: int) -> None:
        with sessions() as session:
            while True:
                with lock:
                    if len(claimed) >= limit:
                        return
                with session.begin():
                    job = claim_next_job(session=session, worker_id=f"scale-{index}", lease_s=600,
                                         max_running_per_user=0)
                if job is None:
                    return
                with lock:
                    claimed.append(job.id)

    began = time.perf_counter()
    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(CLAIMERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    engine.dispose()
    return {"claimers": CLAIMERS, "claims": len(claimed), "per_s": round(len(claimed) / wall, 1),
            "claimed_twice": len(claimed) - len(set(claimed))}


def measure(server: ServerProcess, url: str, users: list[tuple[int, str]], args: argparse.Namespace,
            big_job: dict | None) -> dict:
    from metaserve.service.job_store import encode_cursor

    pid = server.process.pid
    submitter_key = users[0][1]
    result = {"submit": timed_requests(server.url, submitter_key, ["/v1/jobs"] * args.submits,
                                       args.clients, method="POST", body=SPEC, server_pid=pid)}
    reader_id, reader_key = users[50]  # an ordinary user
    own = owned_job_ids(url, reader_id, 2000)
    if not own:  # the empty database: the reader's own jobs come from the API
        timed_requests(server.url, reader_key, ["/v1/jobs"] * 100, args.clients, "POST", SPEC)
        own = owned_job_ids(url, reader_id, 2000)
    rng = random.Random(0)
    result["poll"] = timed_requests(server.url, reader_key,
                                    [f"/v1/jobs/{rng.choice(own)}" for _ in range(args.polls)],
                                    args.clients, server_pid=pid)
    result["list_first_page"] = timed_requests(server.url, reader_key,
                                               ["/v1/jobs?limit=50"] * args.lists, args.clients,
                                               server_pid=pid)
    deep = own[int(len(own) * 0.9)]
    result["list_deep_cursor"] = timed_requests(
        server.url, reader_key, [f"/v1/jobs?limit=50&cursor={encode_cursor(deep)}"] * args.lists,
        args.clients, server_pid=pid)
    result["list_deep_cursor"]["position"] = int(len(own) * 0.9)
    if big_job is not None:
        # Pages of the API's default size (no ``limit``: DEFAULT_METRICS_PAGE values), from 4
        # clients at once and from one client alone.
        admin_key = users[0][1]
        steps = big_job["big_job_steps"]
        for fraction in (0, 0.25, 0.5, 0.99):
            since = int(steps * fraction)
            for name in (None, "train/loss"):
                query = f"since_step={since}" + (f"&name={name}" if name else "")
                paths = [f"/v1/jobs/{big_job['big_job']}/metrics?{query}"] * args.metric_pages
                label = f"metrics_page_{fraction:g}_{'one_series' if name else 'all'}"
                result[label] = timed_requests(server.url, admin_key, paths, 4, server_pid=pid)
                result[label + "_1_client"] = timed_requests(server.url, admin_key, paths, 1,
                                                             server_pid=pid)
        # An ordinary user's own job (its ownership checked in the same statement): one of
        # the history jobs holding PER_JOB_METRIC_ROWS values.
        own_with_metrics = f"{USERS // 2:026x}"
        result["metrics_page_own_job"] = timed_requests(
            server.url, reader_key, [f"/v1/jobs/{own_with_metrics}/metrics"] * args.metric_pages,
            4, server_pid=pid)
    result["claims"] = claims(url, args.claims)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", required=True, help="URL of a database to create ours from")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--metric-rows", type=int, default=10_000_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--submits", type=int, default=2000)
    parser.add_argument("--polls", type=int, default=4000)
    parser.add_argument("--lists", type=int, default=1000)
    parser.add_argument("--claims", type=int, default=800)
    parser.add_argument("--metric-pages", type=int, default=100,
                        help="requests per metrics-page measurement")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    load_at_start = round(os.getloadavg()[0], 2)
    name = f"metaserve_scale_{os.getpid()}"
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
    server = None
    try:
        from metaserve.service.migrate import upgrade

        upgrade(url)
        users = make_users(url)
        directory = Path(tempfile.mkdtemp(prefix="metaserve-scale-"))
        server = ServerProcess(directory, METASERVE_DATABASE_URL=url, METASERVE_DISPATCHER="false")
        server.start()
        empty = measure(server, url, users, args, None)
        filled = fill(url, users, args.jobs, args.metric_rows)
        full = measure(server, url, users, args, filled)
        ratios = {key: round(full[key]["p99_ms"] / empty[key]["p99_ms"], 2)
                  for key in ("poll", "list_first_page", "list_deep_cursor")}
        result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  "load_average_1m_at_start": load_at_start,
                  "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "args": {k: v for k, v in vars(args).items() if k not in ("postgres", "json")},
                  "fill": filled, "empty": empty, "full": full, "p99_full_over_empty": ratios}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if server is not None:
            server.terminate()
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


if __name__ == "__main__":
    main()
