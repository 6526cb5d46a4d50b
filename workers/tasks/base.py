"""What every task family provides, and the counter-based seeding they share.

Task ``t`` of iteration ``i`` on split ``s`` is a pure function of ``(seed, s, i, t)``:
a resumed or re-sharded run samples exactly the tasks an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Protocol, Sequence

import torch

SPLITS = ("train", "val", "test")


class TaskBatch(NamedTuple):
    """A batch of tasks stacked on a leading task axis ``T``.

    Regression: x ``[T, S, in]`` float, y ``[T, S, 1]`` float.
    Classification: x ``[T, S, C, H, W]`` float in [0, 1], y ``[T, S]`` long in [0, ways).
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str) -> "TaskBatch":
        return TaskBatch(*(t.to(device) for t in self))


class TaskFamily(Protocol):
    input_shape: tuple[int, ...]  # one example, e.g. (1,) or (1, 28, 28)
    output_dim: int  # 1 for regression, ``ways`` for classification
    is_classification: bool

    def sample(
        self,
        *,
        seed: int,
        split: str,
        iteration: int,
        task_indices: Sequence[int],
        support_shots: int | None = None,
    ) -> TaskBatch:
        """Sample the given tasks of one iteration (on the CPU)."""
        ...


def task_seed(seed: int, split: str, iteration: int, task_index: int) -> int:
    """A 63-bit seed that depends only on ``(seed, split, iteration, task_index)``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    key = f"{seed}:{split}:{iteration}:{task_index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def task_generator(seed: int, split: str, iteration: int, task_index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`task_seed`."""
    generator = torch.Generator()
    generator.manual_seed(task_seed(seed, split, iteration, task_index))
    return generator
