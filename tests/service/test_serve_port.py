"""``metaserve serve`` on a port that is taken: one line naming the setting to change and
exit 2, before anything is migrated or started (not uvicorn's traceback and exit 3)."""

from __future__ import annotations

import os
import socket
import subprocess

from tests.server_process import metaserve_executable


def test_serve_on_a_taken_port_says_which_setting_to_change_and_exits_2(tmp_path) -> None:  # noqa: ANN001
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "METASERVE_PORT": str(port), "METASERVE_HOST": "127.0.0.1"}
        env.pop("METASERVE_DATABASE_URL", None)
        done = subprocess.run([metaserve_executable(), "serve"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"error: port {port} on 127.0.0.1 is taken (another metaserve "
                           "serve?); set METASERVE_PORT (or --port) to a free port\n")
    assert not list(tmp_path.rglob("*.db"))  # refused before the database was migrated
