"""Acceptance: the real ``metaserve serve`` process on its embedded default (SQLite, no
dispatcher so no Ray), talked to over HTTP with the admin key it wrote."""

from __future__ import annotations

import signal
import stat

import httpx
import pytest

from tests.server_process import ServerProcess

TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}


@pytest.fixture
def server(tmp_path):  # noqa: ANN001
    server = ServerProcess(tmp_path, METASERVE_DISPATCHER="false",
                           METASERVE_MAX_BODY_BYTES="4096").start()
    yield server.url, tmp_path
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert server.terminate(timeout=20) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log_path.read_text()


def test_served_embedded_default_accepts_a_job_with_the_admin_key(server):
    url, cwd = server
    key_path = cwd / ".metaserve" / "admin.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = key_path.read_text().strip()
    assert key.startswith("ms_")
    log = (cwd / "server.log").read_text()
    assert str(key_path.resolve()) in log and key not in log
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/v1/jobs", json=TWO_LINE_SPEC).status_code == 401
        created = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=auth)
        assert created.status_code == 201
        job_id = created.json()["id"]
        fetched = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
        assert (fetched["id"], fetched["status"]) == (job_id, "queued")
        bad = client.post("/v1/jobs", json={"algorithm": {"name": "nope"}}, headers=auth)
        assert bad.status_code == 422
        assert "algorithm" in {d["field"] for d in bad.json()["error"]["details"]}
        streamed = client.post("/v1/jobs", content=(b"x" * 1024 for _ in range(64)),
                               headers={**auth, "Content-Type": "application/json"})
        assert streamed.status_code == 413
        assert client.get("/readyz").json() == {"status": "ok", "dispatcher": "off"}
