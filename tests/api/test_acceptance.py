"""Acceptance: the real ``metaserve serve`` process on its embedded default (SQLite, no
dispatcher so no Ray), talked to over HTTP with the admin key it wrote."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}
STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metaserve_executable() -> str:
    sibling = Path(sys.executable).with_name("metaserve")
    found = str(sibling) if sibling.exists() else shutil.which("metaserve")
    assert found, "the metaserve console script is not installed"
    return found


@pytest.fixture
def server(tmp_path):  # noqa: ANN001
    port = free_port()
    env = {**os.environ, "METASERVE_DISPATCHER": "false", "METASERVE_PORT": str(port),
           "METASERVE_MAX_BODY_BYTES": "4096"}
    env = {k: v for k, v in env.items() if k != "METASERVE_DATABASE_URL"}
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen([metaserve_executable(), "serve"], cwd=tmp_path, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server did not start:\n{(tmp_path / 'server.log').read_text()}")
        time.sleep(0.2)
    yield url, tmp_path
    process.send_signal(signal.SIGTERM)
    try:
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        process.kill()
        log.close()
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()


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
        assert client.get("/readyz").json() == {"status": "ok"}
