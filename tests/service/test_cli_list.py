"""``metaserve list`` at 80 columns (a real process, ``COLUMNS=80``): every status and id
whole, names cut with an ellipsis; ``--name`` filters on the server (a case-insensitive
substring, through every page)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import claim, invoke
from tests.helpers import cli_process as cli

pytestmark = pytest.mark.usefixtures("isolated_config", "artifact_root")

LONG = "sweep-sine-maml-trial-0012-lr-0.001-inner-steps-5"


def submit(tmp_path: Path, name: str) -> str:
    spec = tmp_path / f"{name[:20]}.yaml"
    spec.write_text(f"name: {name}\nalgorithm: {{name: maml}}\ntask_family: {{name: sine}}\n")
    submitted = invoke("submit", "-q", str(spec))
    assert submitted.exit_code == 0, submitted.output
    return submitted.output.strip()


def listed(logged_in: str, *args: str) -> list[str]:  # noqa: F811
    process = cli(logged_in, "list", *args)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return out.splitlines()


def test_list_reads_at_80_columns(logged_in: str, tmp_path: Path, sessions) -> None:  # noqa: ANN001, F811
    long_id = submit(tmp_path, LONG)
    running_id = submit(tmp_path, "maml-sine")
    assert claim(sessions) == long_id
    cancelled = invoke("cancel", long_id)  # running, so "cancelling": the longest status
    assert cancelled.exit_code == 0, cancelled.output
    lines = listed(logged_in)
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    header = lines[0].split()
    assert header == ["name", "status", "progress", "try", "age", "id"]
    rows = {line.split()[-1]: line.split() for line in lines[2:]}
    assert set(rows) == {long_id, running_id}  # ids whole
    assert rows[long_id][1] == "cancelling" and rows[running_id][1] == "queued"
    assert rows[long_id][0].endswith("…") and LONG.startswith(rows[long_id][0][:-1])
    assert rows[running_id][0] == "maml-sine"


def test_list_name_filters_on_the_server_through_every_page(logged_in: str,  # noqa: F811
                                                           tmp_path: Path) -> None:
    wanted = [submit(tmp_path, f"Sine-{i}") for i in range(3)]
    for i in range(4):
        submit(tmp_path, f"cos-{i}")
    lines = listed(logged_in, "--name", "sINe", "--limit", "2")
    assert [line.split()[-1] for line in lines[2:]] == wanted[::-1][:2]
    found = json.loads(invoke("list", "--name", "SINE", "--output", "json").output)
    assert [job["id"] for job in found] == wanted[::-1]
    assert json.loads(invoke("list", "--name", "nothing", "-o", "json").output) == []


def test_list_sorts_and_says_on_stderr_how_many_more_there_are(logged_in: str,  # noqa: F811
                                                               tmp_path: Path) -> None:
    ids = [submit(tmp_path, f"job-{i}") for i in range(3)]
    process = cli(logged_in, "list", "--limit", "2", "--sort", "name", "--order", "asc")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert [line.split()[-1] for line in out.splitlines()[2:]] == ids[:2]
    assert err == "2 of 3 jobs shown; 1 more: --limit 3 lists them all\n"
    refused = invoke("list", "--sort", "colour")
    assert refused.exit_code == 1
    assert refused.output.splitlines()[0] == "error: invalid request: sort (422 validation_error)"
