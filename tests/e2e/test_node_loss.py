"""Losing a Ray node mid-job: the job succeeds with the same bits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_removing_a_ray_node_mid_job_changes_nothing_but_where_the_work_runs() -> None:
    completed = subprocess.run([sys.executable, "-m", "tests.e2e.node_loss"], cwd=REPO,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    assert outcome["removed_node"] is not None
    first, replaced = outcome["placements"][0], outcome["placements"][-1]
    assert len(outcome["placements"]) == 2  # started once, then one replacement
    assert outcome["removed_node"] in first and outcome["removed_node"] not in replaced
    assert outcome["identical"] is True
