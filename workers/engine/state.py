"""The plain data the engine passes around (tensors and ints only, so it serializes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class TrainState:
    """Meta-parameters (incl. Meta-SGD's learned lrs), outer optimizer state, iterations done."""

    params: dict[str, Tensor]
    opt_state: dict[str, Tensor] = field(default_factory=dict)
    iteration: int = 0


@dataclass(frozen=True)
class ShardResult:
    """What one shard of a meta-batch returns: the SUM over its tasks of the per-task
    meta-gradients (Reptile: pseudo-gradients), and per-task metrics ``[n]``. CPU tensors."""

    grad_sum: dict[str, Tensor]
    metrics: dict[str, Tensor]
    num_tasks: int = 0
