"""Infrastructure faults are not the job's: PostgreSQL stopped mid-job for longer than the
lease, then restarted. The dispatcher's writer retries its batches, its lease keeper renews
once the database is back (it never reclaims a job it still supervises), and the job ends
succeeded on attempt 1 with the bits of an undisturbed run.

The database is a PRIVATE PostgreSQL instance the test starts (initdb into a temporary
directory, its own port) and stops in ``finally``: never the shared server."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load, load_file

from metaserve.service import artifacts, migrate, telemetry
from metaserve.service.db import engine_timeouts, make_engine, session_factory
from metaserve.service.dispatcher import Dispatcher
from metaserve.service.settings import Settings
from metaserve.workers.engine import Trainer
from tests.helpers import SHORT_SINE, make_user, reread, submit_short_sine, wait_until
from tests.helpers import wait_for_job as wait_for
from tests.server_process import free_port

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow, pytest.mark.postgres]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
LEASE_S = 4.0
OUTAGE_S = 3 * LEASE_S


class PrivatePostgres:
    """A PostgreSQL 15 of the test's own: ``start``/``stop`` as often as the test likes."""

    def __init__(self, root: Path):
        self.root, self.data, self.port = root, root / "data", free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        # PostgreSQL refuses to run as root: as the postgres user where the tests run as root
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "--no-sync")

    def start(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
                  "-w", "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 "
                  f"-k {self.root} -c fsync=off", "start")

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL 15 at {PG_BIN}")
    root = Path(tempfile.mkdtemp(prefix="metaserve-private-pg-"))
    server = PrivatePostgres(root)
    try:
        server.init()
        server.start()
        yield server
    finally:
        try:
            server.stop()
        except subprocess.SubprocessError:
            pass  # never started, or already stopped
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_down_longer_than_the_lease_costs_no_attempt_and_no_bits(tmp_path: Path):
    spec = {"iterations": 240, "checkpoint_every": 20, "log_every": 5}
    with private_postgres() as database:
        migrate.upgrade(database.url)
        settings = Settings(database_url=database.url, artifact_root=tmp_path / "artifacts",
                            data_dir=tmp_path, dispatcher_concurrency=1, lease_s=LEASE_S,
                            heartbeat_s=1.0, db_connect_timeout_s=2)
        engine = make_engine(database.url, **engine_timeouts(settings))
        sessions = session_factory(engine)
        dispatcher = Dispatcher(settings, sessions)
        try:
            owner, _ = make_user(sessions, "alice")
            job_id = submit_short_sine(sessions, owner, **spec)
            dispatcher.start()
            wait_until(lambda: (job := reread(sessions, job_id)).status == "running"
                       and job.progress.get("iteration", 0) >= 40, 120, "the job at 40")
            retries = telemetry.DATABASE_RETRIES._value.get()
            failed_renewals = telemetry.LEASE_RENEWAL_FAILURES._value.get()
            database.stop()
            down_at = time.monotonic()
            time.sleep(OUTAGE_S)  # the fault itself: the database away for three leases
            database.start()
            outage = time.monotonic() - down_at
            job = wait_for(sessions, job_id, {"succeeded", "failed", "cancelled"}, timeout=300)
            assert (job.status, job.attempt, job.interruptions, job.error) == (
                "succeeded", 1, 0, None), (job.message, job.error)
            assert outage > LEASE_S
            # the outage hit the run: its batches were retried, its lease renewals failed
            assert telemetry.DATABASE_RETRIES._value.get() > retries
            assert telemetry.LEASE_RENEWAL_FAILURES._value.get() > failed_renewals
            _, chunks = artifacts.get_store(settings.storage_config()).open(
                job_id, "meta_init.safetensors")
            served = load(b"".join(chunks))
        finally:
            dispatcher.stop(timeout=30)
            engine.dispose()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the job's worker runs torch on one thread
    try:
        Trainer({**SHORT_SINE, **spec}).run(tmp_path / "undisturbed")
    finally:
        torch.set_num_threads(threads)
    undisturbed = load_file(tmp_path / "undisturbed" / "meta_init.safetensors")
    assert sorted(served) == sorted(undisturbed)
    for name in served:
        assert torch.equal(served[name], undisturbed[name]), name
