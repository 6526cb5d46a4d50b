"""Migration 0014: jobs.metrics_kept_per_series (the retention pass's mark) is added empty to
the jobs there are, and dropped again, keeping the jobs."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from metaserve.service import migrate
from metaserve.service.db import make_engine

pytestmark = pytest.mark.dialects  # batch_alter_table's DDL in each dialect

NOW = "2026-12-06 00:00:00"


def columns(engine) -> set[str]:  # noqa: ANN001
    return {column["name"] for column in inspect(engine).get_columns("jobs")}


def test_the_mark_is_added_empty_and_dropped_keeping_the_jobs(db_url):  # noqa: ANN001
    migrate.upgrade(db_url, "0013")
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO users (id, name, key_hash, is_admin, created_at) "
                                    "VALUES (1, 'alice', 'h', false, :now)"), {"now": NOW})
            connection.execute(text(
                "INSERT INTO jobs (id, owner_id, name, spec, spec_hash, status, attempt, "
                "max_attempts, progress, created_at, updated_at, finished_at) VALUES "
                "(:id, 1, 'j', '{}', 'h', 'succeeded', 1, 1, '{}', :now, :now, :now)"),
                {"id": "A" * 26, "now": NOW})
        assert "metrics_kept_per_series" not in columns(engine)
        migrate.upgrade(db_url, "0014")
        with engine.connect() as connection:
            assert connection.execute(text(
                "SELECT id, status, metrics_kept_per_series FROM jobs")).all() == [
                ("A" * 26, "succeeded", None)]
        migrate.downgrade(db_url, "0013")
        assert "metrics_kept_per_series" not in columns(engine)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id, status FROM jobs")).all() == [
                ("A" * 26, "succeeded")]
    finally:
        engine.dispose()
