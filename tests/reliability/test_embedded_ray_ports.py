"""The embedded default's Ray listens on loopback only.

A real ``metaserve serve`` (``METASERVE_RAY_ADDRESS`` empty: it starts a local Ray) runs one
tiny job to completion, so that the GCS, the raylet, the agents and core workers all exist;
then every TCP listener (``ss -ltnpH``) of the server's processes and of the Ray processes it
started must be on 127.0.0.0/8 or ::1 (gRPC's IPv6 sockets show the IPv4 loopback as
``[::ffff:127.0.0.1]``). Other Ray clusters may run on the same machine (the cluster tests),
so Ray's processes are found by the server's process tree, its session (the server runs in a
session of its own) and the Ray session directory the server's GCS uses, never by name alone.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow

TINY_JOB = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}, "iterations": 20,
            "log_every": 10, "evaluation": {"every": 20, "tasks": 5, "inner_steps": [1]}}
READY_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 240.0
SESSION_DIR = re.compile(r"(/[^\s\0=]*/session_\d{4}-\d\d-\d\d_[\d_-]+)")
USERS = re.compile(r'\("([^"]*)",pid=(\d+),fd=\d+\)')


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name: state, ppid, pgrp, session, ..."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def opened_paths(pid: int) -> list[str]:
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    paths = []
    for name in names:
        try:
            paths.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return paths


def server_and_ray_pids(server_pid: int) -> tuple[set[int], set[str]]:
    """The server's descendants and its session's processes, plus any process that holds a
    file of (or names in its command line) the Ray session directory one of those uses."""
    parents: dict[int, int] = {}
    sessions: dict[int, int] = {}
    for pid in all_pids():
        fields = stat_fields(pid)
        if fields:
            parents[pid], sessions[pid] = int(fields[1]), int(fields[3])
    ours = {server_pid} | {pid for pid, sid in sessions.items() if sid == server_pid}
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in ours} - ours
        ours |= children
        grew = bool(children)
    session_dirs = {found for pid in ours
                    for text in [cmdline(pid), *opened_paths(pid)]
                    for found in SESSION_DIR.findall(text)}
    session_dirs = {path for path in session_dirs if Path(path).is_dir()}
    for pid in parents.keys() - ours:
        texts = [cmdline(pid), *opened_paths(pid)]
        if any(directory in text for directory in session_dirs for text in texts):
            ours.add(pid)
    return ours, session_dirs


def listeners() -> list[tuple[str, int, str, int]]:
    """(address, port, process name, pid) of every TCP listener ``ss`` attributes to a pid."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    found = []
    for line in out.splitlines():
        columns = line.split()
        if len(columns) < 5:
            continue
        address, _, port = columns[3].rpartition(":")
        for name, pid in USERS.findall(line):
            found.append((address.strip("[]"), int(port), name, int(pid)))
    return found


def is_loopback(address: str) -> bool:
    address = address.split("%")[0]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # "*", "0.0.0.0", a host name: not loopback
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_is_loopback_reads_ss_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.53"]))
    assert not any(map(is_loopback, ["*", "0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"]))


@pytest.mark.server
def test_every_listener_of_the_server_and_its_local_ray_is_on_loopback(tmp_path: Path) -> None:
    if not Path("/proc").is_dir() or shutil.which("ss") is None:
        missing = "needs Linux /proc and iproute2's ss"
        if os.environ.get("CI"):  # CI's machine has both: a missing one is a failure there
            pytest.fail(missing)
        pytest.skip(missing)
    server = ServerProcess(tmp_path, METASERVE_RAY_ADDRESS="", METASERVE_HOST="127.0.0.1")
    server.start()
    try:
        assert server.process is not None
        with server.client() as client:
            wait_until(lambda: client.get("/readyz").json().get("dispatcher") == "ready",
                       READY_TIMEOUT_S, "/readyz to say the dispatcher is ready")
            job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
            job = wait_until(
                lambda: (lambda j: j if j["status"] in {"succeeded", "failed", "cancelled"}
                         else None)(client.get(f"/v1/jobs/{job_id}").json()),
                JOB_TIMEOUT_S, "the tiny job to finish")
            assert job["status"] == "succeeded", job

        pids, session_dirs = server_and_ray_pids(server.process.pid)
        assert session_dirs, "found no Ray session directory of the server's local Ray"
        ours = [entry for entry in listeners() if entry[3] in pids]
        described = "\n".join(f"{address}:{port} {name} (pid {pid}: {cmdline(pid)[:120]})"
                              for address, port, name, pid in ours)
        names = {name for _, _, name, _ in ours}
        # not vacuous: ss saw the server's API port and Ray's own servers
        assert ("127.0.0.1", server.port) in {(a, p) for a, p, _, _ in ours}, described
        assert {"gcs_server", "raylet"} <= names, described
        assert any(name.startswith("ray::") for name in names), described  # a core worker
        # token authentication stays on (Ray 2.60's default for a local cluster it starts)
        for pid in {pid for _, _, name, pid in ours if name in {"gcs_server", "raylet"}}:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"RAY_AUTH_MODE=token" in environ, cmdline(pid)
        # the Prometheus servers of the monitor and the dashboard head: any free port, not
        # Ray's fixed defaults (a second Ray on the host went without them)
        assert not {44217, 44227} & {port for _, port, _, _ in ours}, described
        exposed = [entry for entry in ours if not is_loopback(entry[0])]
        assert not exposed, "listening beyond loopback:\n" + "\n".join(
            f"{address}:{port} {name} (pid {pid}: {cmdline(pid)[:120]})"
            for address, port, name, pid in exposed) + "\nall:\n" + described
    finally:
        server.terminate()
