"""The one checkpoint format of every job kind: ``checkpoint.safetensors`` (every tensor of the
job's state) + ``checkpoint.json`` (format, iteration, the rest of the state as JSON, spec),
both written atomically (temporary file + ``os.replace``). No pickle.

The safetensors metadata repeats the iteration; a pair whose iterations disagree (a crash
between the two renames), or files that do not parse, raise :class:`CheckpointError` rather
than being resumed from (the job then fails at once with that line: retrying cannot help).

What the tensors and the state document hold is the driver's business: a meta-learning job
stores ``params/*`` and ``optimizer/*`` (:func:`train_state_tensors`) and an empty document;
a meta-RL job its networks, optimizers, replay buffers and counters. Optimizer moments of a
``torch.optim`` optimizer go through :func:`optimizer_tensors` / :func:`load_optimizer_tensors`,
a library's nested state (RLlib's learner and metrics) through :func:`nested_state_tensors` /
:func:`nested_state_from`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from metaserve.workers.engine.state import TrainState
from metaserve.workers.exceptions import CheckpointError  # noqa: F401 - raised here, imported from here

CHECKPOINT_DIRECTORY = "checkpoint"
CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
PARAMS_PREFIX = "params/"
OPTIMIZER_PREFIX = "optimizer/"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """A job's saved state: its tensors, the rest of it as JSON, and the iterations done."""

    tensors: dict[str, torch.Tensor]
    state: dict = field(default_factory=dict)
    iteration: int = 0


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


def save_checkpoint(directory: Path, checkpoint: Checkpoint, *, spec: dict) -> list[Path]:
    """Write ``checkpoint`` to ``directory``; returns the two files written."""
    directory = Path(directory)
    tensors_path = directory / CHECKPOINT_TENSORS
    json_path = directory / CHECKPOINT_JSON
    atomic_save_tensors(tensors_path, checkpoint.tensors,
                        {"iteration": str(checkpoint.iteration), "format": str(FORMAT_VERSION)})
    document = {"format": FORMAT_VERSION, "iteration": checkpoint.iteration,
                "state": checkpoint.state, "spec": spec}
    atomic_write_bytes(json_path, json.dumps(document, indent=2, sort_keys=True).encode())
    return [tensors_path, json_path]


def load_checkpoint(directory: Path, device: torch.device | str = "cpu") -> Checkpoint | None:
    """The checkpoint in ``directory``, or None when there is none; :class:`CheckpointError`
    when its files do not parse or disagree."""
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
        state = document.get("state", {})  # absent in meta-learning checkpoints of before 0.2
        if not isinstance(state, dict):
            raise ValueError(f"{CHECKPOINT_JSON}: 'state' is not a JSON object")
        tensors = load_file(str(tensors_path), device=str(device))
        iteration = int(document["iteration"])
    except (SafetensorError, ValueError, KeyError, TypeError) as error:  # JSONDecodeError too
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{directory}: not a valid safetensors + JSON checkpoint, "
                              f"refusing to resume from it ({error})") from None
    return Checkpoint(tensors=tensors, state=state, iteration=iteration)


# ---------------------------------------------------------------------- what the drivers store


def train_state_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    """A meta-learning job's state as checkpoint tensors (``params/*``, ``optimizer/*``)."""
    tensors = {PARAMS_PREFIX + name: value for name, value in state.params.items()}
    tensors.update({OPTIMIZER_PREFIX + name: value for name, value in state.opt_state.items()})
    return tensors


def train_state_from(checkpoint: Checkpoint) -> TrainState:
    """The :class:`TrainState` of a meta-learning job's checkpoint."""
    tensors = checkpoint.tensors
    params = {name[len(PARAMS_PREFIX):]: t for name, t in tensors.items() if name.startswith(PARAMS_PREFIX)}
    opt_state = {name[len(OPTIMIZER_PREFIX):]: t for name, t in tensors.items()
                 if name.startswith(OPTIMIZER_PREFIX)}
    if "step" in opt_state:
        opt_state["step"] = opt_state["step"].cpu()
    if not params:
        raise CheckpointError("the checkpoint holds no meta-parameters (params/*): not a "
                              "meta-learning job's checkpoint")
    return TrainState(params=params, opt_state=opt_state, iteration=checkpoint.iteration)


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str,
                      names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The per-parameter state of a ``torch.optim`` optimizer (Adam's moments and step) as
    tensors ``{prefix}{parameter}/{key}``, a parameter named by ``names[index]`` or, without
    ``names``, by its index. Hyper-parameters are not stored: they come from the spec."""
    tensors = {}
    for index, entries in optimizer.state_dict()["state"].items():
        parameter = names[index] if names is not None else str(index)
        for key, value in entries.items():
            tensors[f"{prefix}{parameter}/{key}"] = torch.as_tensor(value).detach().clone()
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           prefix: str, names: list[str] | None = None) -> None:
    """Restore what :func:`optimizer_tensors` stored (a parameter without entries: no state
    yet, as before its first step)."""
    labels = names if names is not None else [str(index) for index in range(_parameter_count(optimizer))]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, parameter in enumerate(labels):
        head = f"{prefix}{parameter}/"
        entries = {key[len(head):]: value for key, value in tensors.items() if key.startswith(head)}
        if entries:
            state[index] = entries
    document = optimizer.state_dict()
    document["state"] = state
    optimizer.load_state_dict(document)


def _parameter_count(optimizer: torch.optim.Optimizer) -> int:
    return sum(len(group["params"]) for group in optimizer.param_groups)


def nested_state_tensors(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every array of a nested state into ``tensors`` (key = path); return the rest, which
    survives JSON: a dict with a key that is not a string (torch's optimizer state is keyed by
    parameter index) becomes ``{"__items__": [[key, value], ...]}``, since JSON would turn its
    keys into strings and the optimizer would then no longer find its moments."""
    if isinstance(tree, dict):
        if all(isinstance(key, str) for key in tree):
            return {key: nested_state_tensors(value, f"{prefix}{key}/", tensors)
                    for key, value in tree.items()}
        return {"__items__": [[key, nested_state_tensors(value, f"{prefix}{key}/", tensors)]
                              for key, value in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return [nested_state_tensors(value, f"{prefix}{index}/", tensors)
                for index, value in enumerate(tree)]
    if isinstance(tree, (np.ndarray, torch.Tensor)):
        tensors[prefix] = torch.as_tensor(np.asarray(tree) if isinstance(tree, np.ndarray) else tree).clone()
        return {"__tensor__": prefix}
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def nested_state_from(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The nested state :func:`nested_state_tensors` took apart (arrays as numpy)."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]].numpy()
        if set(tree) == {"__items__"}:
            return {key: nested_state_from(value, tensors) for key, value in tree["__items__"]}
        return {key: nested_state_from(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [nested_state_from(value, tensors) for value in tree]
    return tree
