"""The README's walkthrough, command by command, as a new user runs it: ``make run`` in one
terminal (the Makefile's real ``run`` recipe, its install step already satisfied), the
client commands in a second one, each as a separate process. The commands are parsed out
of README.md, so the README and this test cannot drift apart. Real server, real local Ray.

Two substitutions only: the server's port (a free one instead of 8000) and, for
``submit``, ``--set`` overrides that shorten the example's training to seconds.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server_process import STARTUP_TIMEOUT_S, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHORT_TRAINING = ["--set", "iterations=300", "--set", "meta_batch_size=25",
                  "--set", "evaluation.every=0", "--set", "evaluation.tasks=100",
                  "--set", "checkpoint_every=100", "--set", "log_every=50"]
COMMAND_TIMEOUT_S = 300


def walkthrough_blocks(readme: str) -> list[list[str]]:
    """The command lines of each ```sh block of the README's "## Walkthrough" section."""
    section = readme.split("\n## Walkthrough\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    return [[line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
            for block in blocks]


def test_the_readme_walkthrough_blocks_are_the_server_and_the_client_commands() -> None:
    server_block, client_block = walkthrough_blocks((REPO / "README.md").read_text())
    assert server_block == ["make run"]
    assert [shlex.split(line)[:2] for line in client_block] == [
        ["metaserve", "login"], ["metaserve", "submit"], ["metaserve", "list"],
        ["metaserve", "status"], ["metaserve", "fetch"], ["python", "examples/adapt_sine.py"],
        ["metaserve", "metrics"]]


def start_make_run(line: str, work: Path, port: int) -> subprocess.Popen:
    """Run the README's ``make run`` in ``work`` against the repository's Makefile, with a
    VENV whose install stamp is current and whose metaserve is this environment's."""
    venv = work / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "metaserve").symlink_to(Path(sys.executable).with_name("metaserve"))
    (work / "pyproject.toml").symlink_to(REPO / "pyproject.toml")
    (venv / ".installed").touch()
    command = shlex.split(line) + ["-f", str(REPO / "Makefile"), f"VENV={venv}"]
    env = {k: v for k, v in os.environ.items() if k != "METASERVE_DATABASE_URL"}
    log = (work / "server.log").open("w")
    process = subprocess.Popen(command, cwd=work, env={**env, "METASERVE_PORT": str(port)},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"make run did not serve:\n{(work / 'server.log').read_text()}")
        time.sleep(0.25)


def run_line(line: str, work: Path, env: dict[str, str], job_id: str | None,
             url: str) -> subprocess.CompletedProcess:
    argv = shlex.split(line.replace("http://127.0.0.1:8000", url))
    if job_id is not None:
        argv = [job_id if arg == "JOB" else arg for arg in argv]
    if argv[0] == "python":
        argv[0] = sys.executable
    if argv[:2] == ["metaserve", "submit"]:
        argv += SHORT_TRAINING
    result = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, f"{line}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_every_walkthrough_command_runs_as_the_readme_says(tmp_path: Path) -> None:
    server_block, client_block = walkthrough_blocks((REPO / "README.md").read_text())
    work = tmp_path / "clone"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("METASERVE_URL", "METASERVE_API_KEY", "METASERVE_DATABASE_URL")}
    env.update(METASERVE_CONFIG=str(tmp_path / "config.toml"),
               XDG_CACHE_HOME=str(tmp_path / "cache"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(REPO), COLUMNS="120")
    server = start_make_run(server_block[0], work, port)
    outputs: dict[str, str] = {}
    job_id = None
    try:
        for line in client_block:
            result = run_line(line, work, env, job_id, url)
            outputs[shlex.split(line)[1]] = result.stdout
            if job_id is None and (found := re.search(r"^submitted (\w{26}) ", result.stdout, re.M)):
                job_id = found.group(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        finally:
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    assert job_id is not None, outputs["submit"]
    assert outputs["login"] == f"logged in to {url}; saved in {tmp_path / 'config.toml'}\n"
    assert outputs["submit"].splitlines()[-1] == f"{job_id} succeeded"
    assert job_id in outputs["list"] and "succeeded" in outputs["list"]
    assert "status:      succeeded" in outputs["status"]
    assert sorted(p.name for p in (work / "sine-maml").iterdir()) == ["meta_init.json",
                                                                       "meta_init.safetensors"]
    mse = dict(re.findall(r"query MSE (before|after) adaptation: +([0-9.]+)",
                          outputs["examples/adapt_sine.py"]))
    assert float(mse["after"]) < float(mse["before"]), outputs["examples/adapt_sine.py"]
    assert (work / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "train/loss_after" in outputs["metrics"]
