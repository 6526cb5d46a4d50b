"""N-way K-shot episode sampling shared by the few-shot image families.

An episode (Vinyals et al. 2016, "Matching Networks for One Shot Learning") picks ``ways``
classes of one split, gives them the labels of a random permutation of ``0..ways-1``, and
draws ``K`` support and ``Q`` query examples per class. Classes, not images, are split into
train/val/test, so a meta-test task only contains classes never seen in meta-training.

Every random choice of task ``t`` is drawn from ``task_generator(seed, split, iteration, t)``
(see :mod:`metaserve.workers.tasks.base`), so a task is a pure function of those four numbers and the
family's spec, whichever other tasks are sampled with it.
"""

from __future__ import annotations

import torch

from metaserve.workers.exceptions import DatasetError  # noqa: F401 - raised here, imported from here
from metaserve.workers.tasks.base import SPLITS, TaskBatch


def split_classes(
    num_classes: int, fractions: tuple[float, float, float], split_seed: int
) -> dict[str, torch.Tensor]:
    """Partition class ids ``0..num_classes-1`` into train/val/test by ``fractions``.

    The classes are shuffled by a generator seeded with ``split_seed`` and cut at
    ``round(f_train·n)`` and ``round((f_train + f_val)·n)``; each split keeps its ids sorted.
    The result depends only on ``(num_classes, fractions, split_seed)``.
    """
    generator = torch.Generator()
    generator.manual_seed(split_seed)
    order = torch.randperm(num_classes, generator=generator)
    train_end = round(fractions[0] * num_classes)
    val_end = round((fractions[0] + fractions[1]) * num_classes)
    bounds = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, num_classes)}
    return {split: order[start:end].sort().values for split, (start, end) in bounds.items()}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def episode_shots(split: str, default_support_shots: int, support_shots: int | None) -> int:
    """Check ``split`` and return the support shots of an episode (the spec's by default)."""
    check_split(split)
    shots = default_support_shots if support_shots is None else support_shots
    if shots < 1:
        raise ValueError(f"support_shots must be at least 1, got {shots}")
    return shots


def choose_classes(
    generator: torch.Generator, num_classes: int, ways: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``ways`` distinct positions in ``0..num_classes-1`` and their episode labels.

    Returns ``(positions [ways], labels [ways])``: class ``positions[i]`` is labelled
    ``labels[i]``, a random permutation of ``0..ways-1``.
    """
    positions = torch.randperm(num_classes, generator=generator)[:ways]
    labels = torch.randperm(ways, generator=generator)
    return positions, labels


def episode_batch(examples: torch.Tensor, labels: torch.Tensor, support_shots: int) -> TaskBatch:
    """Split per-class examples into support and query sets.

    ``examples`` is ``[T, ways, K+Q, C, H, W]`` (any dtype), ``labels`` ``[T, ways]`` long; the
    first ``support_shots`` examples of every class are its support set, the rest its query
    set. Examples stay grouped by class (the order carries no information, the labels are
    a random permutation).
    """
    tasks, ways, shots = examples.shape[:3]
    image_shape = examples.shape[3:]
    query_shots = shots - support_shots
    support_x = examples[:, :, :support_shots].reshape(tasks, ways * support_shots, *image_shape)
    query_x = examples[:, :, support_shots:].reshape(tasks, ways * query_shots, *image_shape)
    support_y = labels[:, :, None].expand(tasks, ways, support_shots).reshape(tasks, ways * support_shots)
    query_y = labels[:, :, None].expand(tasks, ways, query_shots).reshape(tasks, ways * query_shots)
    return TaskBatch(
        support_x.contiguous(), support_y.contiguous(), query_x.contiguous(), query_y.contiguous()
    )
