"""The dispatcher's health check tells the truth: its report says when the database and Ray
last answered and when each running job's lease was last renewed, and ``dispatcher_healthy``
fails, naming the reason, when any of them is older than the lease (not merely when the claim
loop stopped writing)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from metaserve.service.dispatcher import Dispatcher, dispatcher_healthy
from tests.helpers import submit_short_sine as submit
from tests.helpers import wait_until


def write_report(path: Path, **fields: object) -> Path:
    now = time.time()
    report = {"worker_id": "d1", "time": now, "running": [], "database_ok_at": now,
              "ray_ok_at": now, "ray": "connected", "lease_renewed_at": {}}
    report.update(fields)
    path.write_text(json.dumps(report))
    return path


def test_a_fresh_report_with_everything_answering_is_healthy(tmp_path: Path):
    now = time.time()
    path = write_report(tmp_path / "h.json", running=["j1"], lease_renewed_at={"j1": now - 3})
    assert dispatcher_healthy(path, max_age_s=10) == (
        True, "ok: d1 running 1 job(s), leases renewed")


@pytest.mark.parametrize(("ages", "fields", "reason"), [
    ({"time": 1e9}, {}, "last health report"),  # the claim loop is stuck
    ({"database_ok_at": 1e9}, {}, "the database has not answered for"),
    ({"ray_ok_at": 60}, {"ray": "the Ray head (GCS) does not answer: RpcError"},
     "Ray has not answered for 60 s: the Ray head (GCS) does not answer"),
    ({}, {"running": ["j1", "j2"], "lease_renewed_at": {"j1": 0, "j2": 30}},
     "the lease of job j2 was last renewed 30 s ago (1 job(s) past 10 s)"),
])
def test_a_report_fails_naming_what_stopped_answering(tmp_path: Path, ages: dict, fields: dict,
                                                      reason: str):
    """``ages``: seconds before now of the report's times (lease renewals: in ``fields``)."""
    now = time.time()
    fields = {**fields, **{key: now - age for key, age in ages.items()}}
    if "lease_renewed_at" in fields:
        fields["lease_renewed_at"] = {job: now - age for job, age in fields["lease_renewed_at"].items()}
    healthy, why = dispatcher_healthy(write_report(tmp_path / "h.json", **fields), max_age_s=10)
    assert not healthy
    assert why.startswith(reason), why


@pytest.mark.usefixtures("ray_session")
def test_a_running_dispatcher_reports_ray_answering_and_its_leases_renewed(
        settings, sessions, alice):  # noqa: ANN001
    settings = settings.model_copy(update={"heartbeat_s": 1.0, "lease_s": 10.0})
    health = settings.dispatcher_health_path
    live = Dispatcher(settings, sessions, health_path=health)
    live.start()
    try:
        job_id = submit(sessions, alice, iterations=100_000)

        def report() -> dict:
            return json.loads(health.read_text()) if health.exists() else {}

        first = wait_until(lambda: report().get("lease_renewed_at", {}).get(job_id), 120,
                           "the running job in the health report")
        # The renewal time moves on with the heartbeat (not the claim time written once).
        wait_until(lambda: report()["lease_renewed_at"].get(job_id, 0) > first, 30,
                   "a lease renewal after the first report")
        now = report()
        assert now["ray"] == "connected" and now["ray_ok_at"] > 0 and now["database_ok_at"] > 0
        healthy, why = dispatcher_healthy(health, max_age_s=settings.lease_s)
        assert healthy, why
    finally:
        live.stop()
