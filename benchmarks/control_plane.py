"""Control-plane statements per running job (issue #27, point 5): what the dispatchers' lease
renewals and status/cancel polls cost the database, before and after they were batched.

    python benchmarks/control_plane.py [--jobs 1000] [--dispatchers 10 100] [--seconds 30]
        [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test] [--before COMMIT]
        [--json benchmarks/results/control_plane.json]

For each dispatcher count: a fresh database on the PostgreSQL server, migrated, holding
``--jobs`` running jobs whose leases are split evenly over that many dispatchers. Each
dispatcher is a real :class:`~metaserve.service.dispatcher.Dispatcher` whose jobs are
registered as running (their run threads idle: no Ray, no training), and only its lease
machinery runs: after, its one lease keeper (``_keep_leases``); before (``--before``: the
dispatcher at that commit, from a ``git worktree`` of it, run in a child process), one
``_watch`` thread per job, plus the claim loop's "the database still answers" read every
``POLL_S`` that a dispatcher at capacity made (copied from that commit's ``_loop``, whose
first step is connecting to Ray). Every SQL statement the engine sends is counted
(``before_cursor_execute``), and every transaction (``begin``), over ``--seconds`` after a
warm-up of one heartbeat; reported per second and per running job.

    python benchmarks/control_plane.py --retention [--jobs 1000] [--loaded 20] [--series 10]
        [--points 10000] [--budget 1000] [--dialects postgres sqlite]
        [--json benchmarks/results/control_plane_retention.json]

``--retention``: what the metrics retention pass (service/metrics_retention.py) costs. On a
fresh database of each dialect (PostgreSQL: on the ``--postgres`` server; SQLite: a file):
``--jobs`` finished jobs without metrics, a pass (the fixed cost of a job: its mark and its
DELETE finding nothing), then ``--loaded`` more finished jobs each holding ``--series``
series of ``--points`` points, a pass downsampling them to ``--budget``, and a pass with
nothing left to do (every pass after, the steady state). Each pass: statements
(``before_cursor_execute``), transactions, wall time, the longest statement and the longest
write (DELETE or UPDATE: on SQLite, about the longest the pass held the file's write lock,
its commit aside), metric rows before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"api": "api", "service": "service", "workers": "workers", "migrations": "migrations"}


def use_source(source: Path) -> None:
    """Import ``metaserve`` from ``source`` (a checkout of another commit) instead of this
    one: the package and its subpackages mapped as pyproject.toml's package-dir maps them."""
    spec = importlib.util.spec_from_file_location(
        "metaserve", source / "metaserve" / "__init__.py",
        submodule_search_locations=[str(source / "metaserve"), str(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["metaserve"] = module
    spec.loader.exec_module(module)


def measure(url: str, jobs: int, dispatchers: int, seconds: float) -> dict:
    from sqlalchemy import event, insert

    from metaserve.service import dispatcher as dispatch
    from metaserve.service import job_store, migrate
    from metaserve.service.db import make_engine, session_factory
    from metaserve.service.ids import new_id
    from metaserve.service.orm import Job, User, utcnow
    from metaserve.service.settings import Settings

    migrate.upgrade(url)
    per = jobs // dispatchers
    settings = Settings(database_url=url, dispatcher_concurrency=max(1, per))
    engine = make_engine(url, pool_size=min(jobs, 80), max_overflow=0, pool_timeout=120)
    sessions = session_factory(engine)
    now = utcnow()
    owners = [f"bench-dispatcher-{index}" for index in range(dispatchers)]
    rows = [dict(id=new_id(), owner_id=1, name="bench", spec={}, spec_hash="0" * 64,
                 status="running", attempt=1, max_attempts=3, progress={}, created_at=now,
                 updated_at=now, lease_owner=owners[index % dispatchers],
                 lease_expires_at=now.replace(year=now.year + 1))
            for index in range(per * dispatchers)]
    with sessions.begin() as session:
        session.execute(insert(User), [dict(id=1, name="bench", key_hash="0" * 64,
                                            is_admin=False, created_at=now)])
        session.execute(insert(Job.__table__), rows)
    idle = threading.Event()
    threads: list[threading.Thread] = []
    batched = hasattr(dispatch.Dispatcher, "_keep_leases")
    done = threading.Event()
    made = []
    for owner in owners:
        dispatcher = dispatch.Dispatcher(settings, sessions, worker_id=owner)
        for row in rows:
            if row["lease_owner"] != owner:
                continue
            run = types.SimpleNamespace(job_id=row["id"], attempt=1)
            thread = threading.Thread(target=idle.wait, daemon=True)
            thread.start()
            dispatcher._running[row["id"]] = dispatch._Running(run=run, thread=thread)
        made.append(dispatcher)
    statements, transactions = [0], [0]
    lock = threading.Lock()

    @event.listens_for(engine, "before_cursor_execute")
    def count(*_args) -> None:  # noqa: ANN002
        with lock:
            statements[0] += 1

    @event.listens_for(engine, "begin")
    def count_transaction(*_args) -> None:  # noqa: ANN002
        with lock:
            transactions[0] += 1

    for dispatcher in made:
        if batched:
            threads.append(threading.Thread(target=dispatcher._keep_leases, daemon=True))
        else:
            for running in dispatcher._running.values():
                threads.append(threading.Thread(target=dispatcher._watch, args=(running, done),
                                                daemon=True))
            threads.append(threading.Thread(target=_capacity_poll, daemon=True,
                                            args=(dispatcher, job_store, dispatch.POLL_S, done)))
    for thread in threads:
        thread.start()
    time.sleep(settings.heartbeat_s)  # warm-up: every loop running, one renewal round made
    with lock:
        start_statements, start_transactions = statements[0], transactions[0]
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    with lock:
        counted, began = statements[0] - start_statements, transactions[0] - start_transactions
    done.set()
    for dispatcher in made:
        dispatcher._stop.set()
        dispatcher._running.clear()
    idle.set()
    for thread in threads:
        thread.join(10)
    engine.dispose()
    running = per * dispatchers
    return {"code": "after (one lease keeper per dispatcher)" if batched
            else "before (a watch thread per job)",
            "running_jobs": running, "dispatchers": dispatchers, "jobs_per_dispatcher": per,
            "heartbeat_s": settings.heartbeat_s, "seconds": round(elapsed, 2),
            "statements": counted, "transactions": began,
            "statements_per_s": round(counted / elapsed, 1),
            "statements_per_s_per_job": round(counted / elapsed / running, 4),
            "transactions_per_s_per_job": round(began / elapsed / running, 4)}


def _capacity_poll(dispatcher, job_store, poll_s: float, done: threading.Event) -> None:  # noqa: ANN001
    """The old claim loop of a dispatcher at capacity (service/dispatcher.py ``_loop`` at the
    baseline commit): a status read of one running job every ``POLL_S``."""
    while not done.is_set():
        with dispatcher.session_factory.begin() as session:  # the database still answers
            job_store.job_status(session=session, job_id=next(iter(dispatcher._running)))
        done.wait(poll_s)


def measure_retention(url: str, jobs: int, loaded: int, series: int, points: int,
                      budget: int) -> dict:
    """One dialect's retention passes (see the module docstring)."""
    from sqlalchemy import event, func, insert, select, text

    from metaserve.service import migrate
    from metaserve.service.db import make_engine, session_factory
    from metaserve.service.ids import new_id
    from metaserve.service.metrics_retention import retention_pass
    from metaserve.service.orm import Job, Metric, User, utcnow

    migrate.upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    dialect = engine.dialect.name
    now = utcnow()

    def add_jobs(count: int) -> list[str]:
        ids = [new_id() for _ in range(count)]
        with sessions.begin() as session:
            session.execute(insert(Job.__table__), [
                dict(id=job_id, owner_id=1, name="bench", spec={}, spec_hash="0" * 64,
                     status="succeeded", attempt=1, max_attempts=3, progress={}, created_at=now,
                     updated_at=now, started_at=now, finished_at=now) for job_id in ids])
        return ids

    def rows() -> int:
        with sessions() as session:
            return session.scalar(select(func.count()).select_from(Metric))

    def load(job_ids: list[str]) -> float:
        """``series`` × ``points`` rows per job, generated by the database: a falling
        curve with noise (so the lowest and highest values fall anywhere)."""
        started = time.monotonic()
        numbers = ("generate_series(0, :last) AS s(x)" if dialect == "postgresql" else "s")
        names = ("generate_series(0, :series_last) AS n(x)" if dialect == "postgresql" else "n")
        noise = "random()" if dialect == "postgresql" else "(abs(random()) % 1000) / 1000.0"
        prefix = ("" if dialect == "postgresql" else
                  "WITH RECURSIVE s(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM s "
                  "WHERE x < :last), n(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM n "
                  "WHERE x < :series_last) ")
        statement = text(
            f"{prefix}INSERT INTO metrics (job_id, step, name, value, created_at) "
            f"SELECT :job_id, s.x, 'series_' || n.x, 1.0 / (1 + s.x) + 0.1 * {noise}, "
            f":now FROM {numbers}, {names}")
        for job_id in job_ids:
            with sessions.begin() as session:
                session.execute(statement, {"job_id": job_id, "last": points - 1,
                                            "series_last": series - 1, "now": now})
        if dialect == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text("VACUUM ANALYZE metrics"))
                connection.execute(text("VACUUM ANALYZE jobs"))
        return time.monotonic() - started

    counted = {"statements": 0, "transactions": 0, "longest_statement_ms": 0.0,
               "longest_write_ms": 0.0}

    @event.listens_for(engine, "before_cursor_execute")
    def count(connection, *_args) -> None:  # noqa: ANN001, ANN002
        counted["statements"] += 1
        connection.info["statement_started"] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def time_statement(connection, _cursor, statement: str, *_args) -> None:  # noqa: ANN001, ANN002
        took = (time.perf_counter() - connection.info.pop("statement_started")) * 1000
        counted["longest_statement_ms"] = round(max(counted["longest_statement_ms"], took), 1)
        if statement.lstrip().startswith(("DELETE", "UPDATE")):
            counted["longest_write_ms"] = round(max(counted["longest_write_ms"], took), 1)

    @event.listens_for(engine, "begin")
    def count_transaction(*_args) -> None:  # noqa: ANN002
        counted["transactions"] += 1

    def one_pass(label: str) -> dict:
        before = rows()
        counted.update(statements=0, transactions=0, longest_statement_ms=0.0,
                       longest_write_ms=0.0)
        done = retention_pass(sessions, budget)
        measured = dict(counted)
        after = rows()
        entry = {"pass": label, "jobs_downsampled": done.jobs, "rows_deleted": done.deleted,
                 "rows_before": before, "rows_after": after, **measured,
                 "ms": round(done.seconds * 1000, 1),
                 "ms_per_job": round(done.seconds * 1000 / done.jobs, 2) if done.jobs else None,
                 "load_1_5_15": os.getloadavg()}
        print(json.dumps({"dialect": dialect, **entry}), file=sys.stderr)
        return entry

    with sessions.begin() as session:
        session.execute(insert(User), [dict(id=1, name="bench", key_hash="0" * 64,
                                            is_admin=False, created_at=now)])
    passes = []
    add_jobs(jobs)
    passes.append(one_pass(f"{jobs:,} finished jobs, no metrics"))
    loading_s = load(add_jobs(loaded))
    per_series = {}
    with sessions() as session:  # before: one loaded job's series lengths
        sample = session.scalar(select(Metric.job_id).limit(1))
    passes.append(one_pass(f"{loaded} finished jobs × {series} series × {points:,} points"))
    with sessions() as session:
        per_series = dict(session.execute(select(Metric.name, func.count()).where(
            Metric.job_id == sample).group_by(Metric.name)).all())
    passes.append(one_pass("steady state: nothing left to do"))
    engine.dispose()
    return {"dialect": dialect, "budget": budget, "jobs": jobs, "loaded": loaded,
            "series": series, "points": points, "loading_s": round(loading_s, 1),
            "points_per_series_after": sorted(set(per_series.values())), "passes": passes}


def fresh_database(server: str) -> tuple[str, callable]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"metaserve_cp_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return make_url(server).set(database=name).render_as_string(hide_password=False), drop


def run_here(args: argparse.Namespace) -> list[dict]:
    results = []
    for dispatchers in args.dispatchers:
        url, drop = fresh_database(args.postgres)
        try:
            results.append(measure(url, args.jobs, dispatchers, args.seconds))
        finally:
            drop()
        print(json.dumps(results[-1]), file=sys.stderr)
    return results


def run_before(commit: str, args: argparse.Namespace) -> list[dict]:
    """This script, on the dispatcher of ``commit`` (a git worktree of it, removed after)."""
    tree = Path(tempfile.mkdtemp(prefix="control-plane-before-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit],
                   check=True, capture_output=True)
    try:
        out = tree.parent / "before.json"
        command = [sys.executable, __file__, "--source", str(tree), "--jobs", str(args.jobs),
                   "--seconds", str(args.seconds), "--postgres", args.postgres,
                   "--json", str(out), "--dispatchers", *map(str, args.dispatchers)]
        subprocess.run(command, check=True)
        return json.loads(out.read_text())["runs"]
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                       check=False, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--dispatchers", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--before", default=None, help="commit of the dispatcher to compare with")
    parser.add_argument("--source", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--retention", action="store_true",
                        help="measure the metrics retention pass instead")
    parser.add_argument("--loaded", type=int, default=20)
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--dialects", nargs="+", default=["postgres", "sqlite"],
                        choices=["postgres", "sqlite"])
    args = parser.parse_args()
    if args.retention:
        sys.path.insert(0, str(REPO))
        main_retention(args)
        return
    if args.source is not None:
        use_source(args.source)
    else:
        sys.path.insert(0, str(REPO))
    runs = run_here(args)
    if args.source is not None:
        args.json.write_text(json.dumps({"runs": runs}))
        return
    before = run_before(args.before, args) if args.before else []
    result = {
        **provenance(),
        "before_commit": args.before, "before": before, "after": runs,
        "target_statements_per_s_per_job": 0.2,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def provenance() -> dict:
    """The command, machine, load at the end and commit every result of this script carries."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": os.cpu_count(), "load_1_5_15_at_end": os.getloadavg()},
        "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
    }


def main_retention(args: argparse.Namespace) -> None:
    runs = []
    for dialect in args.dialects:
        if dialect == "postgres":
            url, drop = fresh_database(args.postgres)
        else:
            directory = Path(tempfile.mkdtemp(prefix="control-plane-retention-"))
            url = f"sqlite:///{directory / 'metaserve.db'}"

            def drop(directory: Path = directory) -> None:
                import shutil

                shutil.rmtree(directory, ignore_errors=True)
        try:
            runs.append(measure_retention(url, args.jobs, args.loaded, args.series,
                                          args.points, args.budget))
        finally:
            drop()
    result = {
        **provenance(),
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
