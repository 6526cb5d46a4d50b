"""Start and stop a real ``metaserve serve`` process for acceptance tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metaserve_executable() -> str:
    sibling = Path(sys.executable).with_name("metaserve")
    found = str(sibling) if sibling.exists() else shutil.which("metaserve")
    assert found, "the metaserve console script is not installed"
    return found


class ServerProcess:
    """``metaserve serve`` in ``cwd`` (its embedded default lives in ``cwd/.metaserve``)."""

    def __init__(self, cwd: Path, port: int | None = None, **env: str):
        self.cwd = Path(cwd)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k != "METASERVE_DATABASE_URL"}
        self.env.update({"METASERVE_PORT": str(self.port), **env})
        self.log_path = self.cwd / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        # `make test-fast` sets METASERVE_TEST_TIER=fast: a test that gets here unmarked fails
        # there, so the fast tier cannot quietly grow a server start.
        assert os.environ.get("METASERVE_TEST_TIER") != "fast", (
            "this test starts `metaserve serve`: mark it `server` (or give it a fixture that does)")
        log = self.log_path.open("a")
        # A process group of its own, so a SIGKILL of the group takes the server and the
        # local Ray it started, as a machine losing the process would.
        self.process = subprocess.Popen([metaserve_executable(), "serve"], cwd=self.cwd,
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.2)

    @property
    def admin_key(self) -> str:
        return (self.cwd / ".metaserve" / "admin.key").read_text().strip()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {self.admin_key}"})

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: uvicorn shuts down gracefully, then re-raises the signal."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server's whole process group (no clean-up runs)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
