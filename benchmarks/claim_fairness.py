"""Cost of the fair claim (issue "one user cannot take the service down", point 3).

    python benchmarks/claim_fairness.py [--users 100] [--jobs-per-user 100] [--claims 200]
        [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test] [--baseline COMMIT]
        [--json out.json]

Fills an empty database (a SQLite file; and a fresh database on the PostgreSQL server given)
with ``users × jobs-per-user`` queued jobs, all of the first user's, then all of the second
user's, ... (the order in which an oldest-first claim serves one user only), then times
``claim_next_job`` (one transaction each, as the dispatcher calls it) ``--claims`` times in a
row: the new claim with METASERVE_MAX_RUNNING_JOBS_PER_USER = 4 and without a cap, and, with
``--baseline``, the claim of ``service/store.py`` at that commit (oldest job first, no
fairness) on the same schema. Each variant starts from a fresh fill. Reports the median, p95
and mean milliseconds of one claim.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, insert, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from metaserve.service import jobs  # noqa: E402
from metaserve.service.db import make_engine, session_factory  # noqa: E402
from metaserve.service.ids import new_id  # noqa: E402
from metaserve.service.orm import Base, Job, JobStatusEvent, User, utcnow  # noqa: E402

SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}
RUNNING_CAP = 4


def fill(sessions, users: int, jobs_per_user: int) -> None:  # noqa: ANN001
    now = utcnow()
    with sessions() as session:
        session.execute(insert(User), [dict(id=index + 1, name=f"user{index}",
                                            key_hash=f"{index:064d}", is_admin=False,
                                            created_at=now) for index in range(users)])
        rows = []
        for owner in range(1, users + 1):  # one user's jobs after another's: the worst case
            for _ in range(jobs_per_user):
                rows.append(dict(id=new_id(), owner_id=owner, name="maml-sine", spec=SPEC,
                                 spec_hash="0" * 64, status="queued", attempt=0, max_attempts=3,
                                 progress={}, created_at=now, updated_at=now))
        session.execute(insert(Job.__table__), rows)
        session.execute(insert(JobStatusEvent.__table__), [
            dict(job_id=row["id"], status="queued", attempt=0, created_at=now) for row in rows])
        session.commit()
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("ANALYZE"))
            session.commit()


def baseline_claim(commit: str):  # noqa: ANN201
    """``claim_next_job`` of service/store.py at ``commit`` (before the claim moved to
    service/claims.py), run in a transaction."""
    source = subprocess.run(["git", "show", f"{commit}:service/store.py"], check=True,
                            capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_store.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_store", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def claim(*, session, worker_id: str, lease_s: float, **_):  # noqa: ANN001, ANN003, ANN202
        with session.begin():
            return module.claim_next_job(session=session, worker_id=worker_id, lease_s=lease_s)
    return claim


def time_claims(url: str, claim, cap: int, args: argparse.Namespace) -> dict:  # noqa: ANN001
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    sessions = session_factory(engine)
    fill(sessions, args.users, args.jobs_per_user)
    times, owners = [], []
    with sessions() as session:
        for _ in range(args.claims):
            start = time.perf_counter()
            job = claim(session=session, worker_id="bench", lease_s=3600.0,
                        max_running_per_user=cap)
            times.append((time.perf_counter() - start) * 1000)
            owners.append(job.owner_id)
    engine.dispose()
    times.sort()
    return {"median_ms": round(statistics.median(times), 3),
            "p95_ms": round(times[int(0.95 * len(times)) - 1], 3),
            "mean_ms": round(statistics.fmean(times), 3),
            "distinct_users_in_first_100_claims": len(set(owners[:100]))}


def databases(postgres: str | None):  # noqa: ANN201
    """(name, url factory) pairs; each call of a factory gives an empty database."""
    directory = Path(tempfile.mkdtemp())
    yield "sqlite", lambda: f"sqlite:///{directory / uuid.uuid4().hex}.db"
    if postgres:
        admin = create_engine(postgres, isolation_level="AUTOCOMMIT")
        created = []

        def fresh() -> str:
            name = f"metaserve_bench_{uuid.uuid4().hex[:12]}"
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            created.append(name)
            return make_url(postgres).set(database=name).render_as_string(hide_password=False)
        try:
            yield "postgresql", fresh
        finally:
            with admin.connect() as connection:
                for name in created:
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--jobs-per-user", type=int, default=100)
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--postgres", default=None, help="PostgreSQL server URL (optional)")
    parser.add_argument("--baseline", default=None, help="commit of the claim to compare with")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    variants = [("fair, running cap 4", jobs.claim_next_job, RUNNING_CAP),
                ("fair, no cap", jobs.claim_next_job, 0)]
    if args.baseline:
        variants.insert(0, (f"before ({args.baseline})", baseline_claim(args.baseline), 0))
    results = {"users": args.users, "jobs_per_user": args.jobs_per_user, "claims": args.claims,
               "python": platform.python_version(), "machine": platform.machine(),
               "cpus": __import__("os").cpu_count(), "claim": {}}
    for database, fresh in databases(args.postgres):
        for name, claim, cap in variants:
            result = time_claims(fresh(), claim, cap, args)
            results["claim"][f"{database} / {name}"] = result
            print(f"{database:10s} {name:28s} {json.dumps(result)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
