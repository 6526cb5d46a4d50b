"""The README's walkthrough as a newcomer runs it: ``make run`` in one terminal (the Makefile's
real ``run`` recipe, its install step already satisfied), then the second terminal's block in
one fresh shell — no virtualenv on PATH, no PYTHONPATH, an empty HOME — and the Python
snippets as they are written. Everything is parsed out of README.md, so the README and this
test cannot drift apart. Real server, real local Ray.

The clone is a fresh ``git clone`` of this repository (its committed files); as its
``.venv`` it has the virtualenv ``make run`` would have created (this environment's). Two
substitutions: the server's port (a free one instead of 8000), and ``make run``'s VENV: a
directory whose install stamp is current and whose ``metaserve`` is this environment's (a
real install would rewrite the shared virtualenv). The training is kept short by the
``--set``/``overrides`` the README itself shows.
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
README_URL = "http://127.0.0.1:8000"
BLOCK_TIMEOUT_S = 600
FRESH_PATH = "/usr/local/bin:/usr/bin:/bin"


def section(readme: str, heading: str) -> str:
    return readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def command_lines(block: str) -> list[str]:
    """The block's command lines, without their trailing comments."""
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def walkthrough() -> tuple[list[str], list[str], list[str]]:
    """The server terminal's lines, the client terminal's lines and the Python snippets."""
    readme = (REPO / "README.md").read_text()
    server_block, client_block = code_blocks(section(readme, "Walkthrough"), "sh")
    snippets = code_blocks(section(readme, "The same in Python"), "python")
    return command_lines(server_block), command_lines(client_block), snippets


def fresh_environment(home: Path) -> dict[str, str]:
    """What a new terminal has: a HOME and the system PATH, nothing of this test's Python."""
    home.mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "PATH": FRESH_PATH, "LANG": "C.UTF-8"}


def test_the_walkthrough_is_the_server_the_client_commands_and_two_snippets() -> None:
    server, client, snippets = walkthrough()
    assert server == ["make run"]
    assert [shlex.split(line)[:2] for line in client] == [
        ["source", ".venv/bin/activate"], ["metaserve", "login"],
        ["JOB=$(metaserve", "submit"], ["metaserve", "wait"], ["metaserve", "status"],
        ["metaserve", "metrics"],
        ["metaserve", "fetch"], ["python", "examples/adapt_sine.py"], ["metaserve", "list"]]
    assert len(snippets) == 2


def start_make_run(line: str, work: Path, port: int) -> subprocess.Popen:
    """Run the README's ``make run`` in the clone ``work`` with a VENV whose install stamp is
    current and whose metaserve is this environment's."""
    venv = work.parent / "server-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "metaserve").symlink_to(Path(sys.executable).with_name("metaserve"))
    (venv / ".serve-installed").touch()  # the stamp `make run` checks
    command = shlex.split(line) + [f"VENV={venv}"]
    env = {**fresh_environment(work.parent / "server-home"), "METASERVE_PORT": str(port)}
    log = (work.parent / "server.log").open("w")
    process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"make run did not serve:\n{(work.parent / 'server.log').read_text()}")
        time.sleep(0.25)


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_in_one_shell(lines: list[str], work: Path, env: dict[str, str]) -> tuple[list[str], str]:
    """Run ``lines`` one after another in one bash (so ``source`` and ``JOB=`` carry over),
    stopping at the first that fails; returns each line's output and the final ``$JOB``."""
    script = ["set -e -o pipefail"]
    for index, line in enumerate(lines):
        script += [line, f"echo '@@@ {index}'"]
    script.append('echo "@@@ JOB=${JOB:-}"')
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=BLOCK_TIMEOUT_S)
    parts = re.split(r"^@@@ (?:\d+|JOB=(\w*))\n", done.stdout, flags=re.M)
    outputs, job_ids = parts[0::2], [part for part in parts[1::2] if part]
    assert done.returncode == 0 and len(outputs) == len(lines) + 2, (
        f"failed after {len(outputs) - 1} of the README's lines, at: "
        f"{lines[len(outputs) - 1] if len(outputs) <= len(lines) else ''}\n{done.stdout}")
    assert "Traceback" not in done.stdout, done.stdout
    return outputs[:len(lines)], (job_ids or [""])[0]


def run_python(snippet: str, work: Path, env: dict[str, str]) -> str:
    (work / "snippet.py").write_text(snippet)
    done = subprocess.run([str(work / ".venv" / "bin" / "python"), "snippet.py"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, f"{snippet}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def test_the_readme_runs_as_written_in_a_fresh_shell(tmp_path: Path) -> None:
    server_lines, client_lines, (snippet, offline_snippet) = walkthrough()
    work = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{REPO}", str(work)],
                   check=True, timeout=120)
    (work / ".venv").symlink_to(Path(sys.prefix))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = tmp_path / "home"
    env = fresh_environment(home)
    server = start_make_run(server_lines[0], work, port)
    try:
        outputs, job_id = run_in_one_shell([line.replace(README_URL, url) for line in client_lines],
                                           work, env)
        printed = run_python(snippet, work, env)
    finally:
        stop(server)
    login, submit, wait, status, metrics, fetch, adapt, listed = outputs[1:]
    offline = run_python(offline_snippet, work, fresh_environment(tmp_path / "offline-home"))

    assert login == f"logged in to {url}; saved in {home}/.config/metaserve/config.toml\n"
    assert re.fullmatch(r"[0-9A-Z]{26}", job_id) and submit == ""
    assert wait.splitlines()[-1] == f"{job_id} succeeded"
    assert "status:      succeeded" in status
    assert "train/loss_after" in metrics and (work / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (work / "sine-maml").iterdir()) == ["meta_init.json",
                                                                       "meta_init.safetensors"]
    mse = dict(re.findall(r"query MSE (before|after) adaptation: +([0-9.]+)", adapt))
    assert float(mse["after"]) < float(mse["before"]), adapt
    row = next(line for line in listed.splitlines() if job_id in line)  # a pipe's 80 columns
    assert "succeeded" in row.split() and len(row) <= 80, listed
    found = re.fullmatch(r"query MSE before ([0-9.]+), after ([0-9.]+)", printed.splitlines()[-1])
    assert found is not None and float(found[2]) < float(found[1]), printed  # above: wait's bar
    assert offline == "maml 1 0.01\n"


# --------------------------------------------------------------------------- "Your own data"

OWN_DATA_TIMEOUT_S = 1500  # two blocks of jobs on a busy 2-core machine (README: minutes each)


def own_data() -> tuple[list[str], list[str], list[str]]:
    """The walkthrough's terminal setup (activate, login), then the section's table block and
    its image block."""
    readme = (REPO / "README.md").read_text()
    _, client_block = code_blocks(section(readme, "Walkthrough"), "sh")
    table_block, images_block = code_blocks(section(readme, "Your own data"), "sh")
    return (command_lines(client_block)[:2], command_lines(table_block),
            command_lines(images_block))


def test_the_own_data_section_exports_uploads_trains_both_and_compares() -> None:
    setup, table, images = own_data()
    assert [shlex.split(line)[:2] for line in setup] == [["source", ".venv/bin/activate"],
                                                         ["metaserve", "login"]]
    assert [shlex.split(line)[:2] for line in table] == [
        ["python", "examples/export_panel_csv.py"], ["DATA=$(metaserve", "datasets"],
        ["MAML=$(metaserve", "submit"], ["POOLED=$(metaserve", "submit"],
        ["metaserve", "wait"], ["metaserve", "wait"], ["python", "examples/held_out_error.py"]]
    assert [shlex.split(line)[:2] for line in images] == [
        ["python", "examples/make_glyphs_npz.py"], ["IMAGES=$(metaserve", "datasets"],
        ["JOB=$(metaserve", "submit"], ["metaserve", "wait"], ["metaserve", "status"]]


@pytest.mark.timeout(OWN_DATA_TIMEOUT_S)
def test_the_own_data_section_runs_as_written_in_a_fresh_shell(tmp_path: Path) -> None:
    setup, table, images = own_data()
    work = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{REPO}", str(work)],
                   check=True, timeout=120)
    (work / ".venv").symlink_to(Path(sys.prefix))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = fresh_environment(tmp_path / "home")
    server = start_make_run("make run", work, port)
    setup = [line.replace(README_URL, url) for line in setup]
    try:
        table_outputs, _ = run_in_one_shell(setup + table, work, env)
        image_outputs, image_job = run_in_one_shell(setup + images, work, env)
    finally:
        stop(server)
    exported, _, _, _, wait_maml, wait_pooled, compared = table_outputs[2:]
    assert exported.startswith("wrote mathachieve.csv: 7185 rows, 160 schools"), exported
    assert wait_maml.splitlines()[-1].endswith(" succeeded"), wait_maml
    assert wait_pooled.splitlines()[-1].endswith(" succeeded"), wait_pooled
    header, columns, *rows = compared.splitlines()
    assert header.startswith("held-out-entity MSE of math_ach"), compared
    assert [row.split()[:2] for row in rows] == [["mathachieve-maml", "maml"],
                                                 ["mathachieve-finetune", "finetune"]], compared
    for row in rows:  # before ± ci, after ± ci, steps: squared points of a 0-25 score
        before, _, before_ci, after, _, after_ci, steps = row.split()[2:]
        assert 1.0 < float(after) < 100.0 and 0.0 < float(after_ci) < float(after), row
        assert steps == "5", row
    made, _, _, wait_images, status = image_outputs[2:]
    assert made.startswith("wrote glyphs.npz: 2000 images of 100 classes"), made
    assert wait_images.splitlines()[-1] == f"{image_job} succeeded"
    assert "status:      succeeded" in status
