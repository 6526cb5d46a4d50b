"""Migration 0011: a sweep's Idempotency-Key moves to its driver job (one idempotency path),
compared by the sweep's config hash; a key the owner also gave a job stays only the job's."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from metaserve.service import migrate
from metaserve.service.db import make_engine

pytestmark = pytest.mark.dialects  # the UPDATEs' correlated subqueries in each dialect

NOW = "2026-12-06 00:00:00"


def insert_job(connection, job_id: str, key: str | None) -> None:  # noqa: ANN001
    connection.execute(text(
        "INSERT INTO jobs (id, owner_id, name, spec, spec_hash, status, attempt, max_attempts, "
        "progress, idempotency_key, created_at, updated_at) VALUES (:id, 1, 'j', '{}', "
        "'spec-hash', 'queued', 0, 1, '{}', :key, :now, :now)"), {"id": job_id, "key": key,
                                                                  "now": NOW})


def test_sweep_keys_move_to_their_driver_jobs_and_back(db_url):  # noqa: ANN001
    migrate.upgrade(db_url, "0010")
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO users (id, name, key_hash, is_admin, created_at) "
                                    "VALUES (1, 'alice', 'h', false, :now)"), {"now": NOW})
            insert_job(connection, "A" * 26, None)      # driver of sweep a (keyed)
            insert_job(connection, "B" * 26, None)      # driver of sweep b (key also a job's)
            insert_job(connection, "C" * 26, "shared")  # a job with the key sweep b used
            for sweep_id, driver, key in (("sw_a", "A" * 26, "sweep-key"),
                                          ("sw_b", "B" * 26, "shared")):
                connection.execute(text(
                    "INSERT INTO sweeps (id, owner_id, name, config, config_hash, driver_job_id, "
                    "idempotency_key, created_at) VALUES (:id, 1, 's', '{}', :hash, :driver, "
                    ":key, :now)"), {"id": sweep_id, "hash": f"config-{sweep_id}",
                                     "driver": driver, "key": key, "now": NOW})
        migrate.upgrade(db_url)
        with engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT id, idempotency_key, spec_hash FROM jobs ORDER BY id")).all()
        assert [tuple(row) for row in rows] == [("A" * 26, "sweep-key", "config-sw_a"),
                                                ("B" * 26, None, "config-sw_b"),
                                                ("C" * 26, "shared", "spec-hash")]
        migrate.downgrade(db_url, "0010")
        with engine.connect() as connection:
            sweeps = connection.execute(text(
                "SELECT id, idempotency_key FROM sweeps ORDER BY id")).all()
            keys = connection.execute(text(
                "SELECT id, idempotency_key FROM jobs ORDER BY id")).all()
        assert [tuple(row) for row in sweeps] == [("sw_a", "sweep-key"), ("sw_b", None)]
        assert [tuple(row) for row in keys] == [("A" * 26, None), ("B" * 26, None),
                                                ("C" * 26, "shared")]
    finally:
        engine.dispose()
