"""Checkpoints: ``checkpoint.safetensors`` (params, outer optimizer state) + ``checkpoint.json``
(iteration, spec), both written atomically (temporary file + ``os.replace``). No pickle.

The safetensors metadata repeats the iteration; a pair whose iterations disagree (a crash
between the two renames) is rejected rather than resumed from.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from metaserve.workers.engine.state import TrainState

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
PARAMS_PREFIX = "params/"
OPTIMIZER_PREFIX = "optimizer/"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """The checkpoint is unreadable or inconsistent."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_checkpoint(state: TrainState, directory: Path, *, spec: dict) -> list[Path]:
    directory = Path(directory)
    tensors = {PARAMS_PREFIX + name: value for name, value in state.params.items()}
    tensors.update({OPTIMIZER_PREFIX + name: value for name, value in state.opt_state.items()})
    tensors_path = directory / CHECKPOINT_TENSORS
    json_path = directory / CHECKPOINT_JSON
    atomic_save_tensors(tensors_path, tensors, {"iteration": str(state.iteration), "format": str(FORMAT_VERSION)})
    document = {"format": FORMAT_VERSION, "iteration": state.iteration, "spec": spec}
    atomic_write_bytes(json_path, json.dumps(document, indent=2, sort_keys=True).encode())
    return [tensors_path, json_path]


def load_checkpoint(directory: Path, device: torch.device | str = "cpu") -> TrainState | None:
    """The checkpoint in ``directory``, or None when there is none."""
    directory = Path(directory)
    tensors_path = directory / CHECKPOINT_TENSORS
    json_path = directory / CHECKPOINT_JSON
    if not tensors_path.exists() or not json_path.exists():
        return None
    from safetensors import SafetensorError, safe_open

    try:  # safetensors parses a JSON header and raw tensors: a planted pickle is refused here
        document = json.loads(json_path.read_text())
        if not isinstance(document, dict):
            raise ValueError(f"{CHECKPOINT_JSON} is not a JSON object")
        with safe_open(str(tensors_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("iteration") != str(document.get("iteration")):
            raise CheckpointError(
                f"{directory}: checkpoint files disagree on the iteration "
                f"({metadata.get('iteration')} vs {document.get('iteration')})")
        tensors = load_file(str(tensors_path), device=str(device))
    except (SafetensorError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError too
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{directory}: not a valid safetensors + JSON checkpoint, "
                              f"refusing to resume from it ({error})") from None
    params = {name[len(PARAMS_PREFIX):]: t for name, t in tensors.items() if name.startswith(PARAMS_PREFIX)}
    opt_state = {name[len(OPTIMIZER_PREFIX):]: t for name, t in tensors.items() if name.startswith(OPTIMIZER_PREFIX)}
    if "step" in opt_state:
        opt_state["step"] = opt_state["step"].cpu()
    return TrainState(params=params, opt_state=opt_state, iteration=int(document["iteration"]))
