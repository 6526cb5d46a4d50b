"""The artifact writer: the same weights make the same file, in any process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WRITE = """
import sys, torch
from pathlib import Path
from metaserve.workers.engine.final_artifact import export_artifact
export_artifact(Path(sys.argv[1]), kind="meta_init", tensors={"w": torch.arange(6.0).reshape(2, 3)},
                architecture={}, recipe={}, task_family={}, evaluation={}, spec={}, iteration=1)
"""


def test_the_same_weights_written_by_two_processes_are_the_same_bytes(tmp_path: Path) -> None:
    """safetensors orders its metadata map by a per-process hash seed: with more than one
    key, two processes (a resumed run and an undisturbed one) wrote different files, in about
    half of the pairs: four processes all agree by chance 1 time in 8."""
    files = []
    for run in range(4):
        directory = tmp_path / str(run)
        subprocess.run([sys.executable, "-c", WRITE, str(directory)], check=True, timeout=120,
                       env={"PYTHONHASHSEED": "random", "PATH": ""})
        files.append((directory / "meta_init.safetensors").read_bytes())
    assert len(set(files)) == 1
