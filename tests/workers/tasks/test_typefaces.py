"""The hard built-in family: characters drawn by different fonts, split by script group with no
identity or near-duplicate across splits, support and query from different fonts, and a raw-pixel
nearest-prototype floor far below the easy ``glyphs`` family's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metaserve.workers.spec import TypefacesSpec
from metaserve.workers.tasks import build_task_family
from metaserve.workers.tasks.typefaces import SELECTION_SIZE, render_all


def pixel_floor(batch) -> float:  # noqa: ANN001
    """Accuracy of the nearest class mean of raw pixels (no learning)."""
    support_x, support_y, query_x, query_y = batch
    one_hot = F.one_hot(support_y).float()
    prototypes = one_hot.transpose(1, 2) @ support_x.flatten(2) / one_hot.sum(1)[..., None]
    guesses = torch.cdist(query_x.flatten(2), prototypes).argmin(-1)
    return float((guesses == query_y).float().mean())


def test_every_class_is_drawn_by_6_to_21_fonts() -> None:
    """(The split itself: tests/workers/tasks/test_typeface_split.py.)"""
    masks = render_all(SELECTION_SIZE)[2]
    assert int(masks.sum(1).min()) >= 6 and int(masks.sum(1).max()) == 21


def test_the_family_serves_the_splits_classes() -> None:
    family = build_task_family(TypefacesSpec(ways=20, support_shots=1, query_shots=1))
    assert {split: family.classes(split) for split in ("train", "val", "test")} == {
        "train": 1396, "val": 250, "test": 298}
    assert not set(family.split_characters("train")) & set(family.split_characters("test"))


def test_support_and_query_images_of_a_class_come_from_different_fonts() -> None:
    family = build_task_family(TypefacesSpec(ways=5, support_shots=2, query_shots=8))
    for task in range(20):
        generator = torch.Generator().manual_seed(task)
        classes = family._splits["train"][torch.randperm(len(family._splits["train"]),
                                                         generator=generator)[:5]]
        fonts = family._fonts(generator, classes, 2, 8)
        for row, c in zip(fonts.tolist(), classes.tolist()):
            support, query = set(row[:2]), set(row[2:])
            assert len(support) == 2 and not support & query
            assert all(bool(family.masks[c, f]) for f in row)


def test_tasks_are_a_pure_function_of_the_counter_seed() -> None:
    family = build_task_family(TypefacesSpec(ways=5, support_shots=1, query_shots=3))
    first = family.sample(seed=3, split="test", iteration=7, task_indices=[0, 1])
    again = family.sample(seed=3, split="test", iteration=7, task_indices=[1])
    assert first.support_x.shape == (2, 5, 1, 28, 28) and first.query_y.shape == (2, 15)
    assert torch.equal(first.query_x[1], again.query_x[0])
    assert torch.equal(first.support_y[1], again.support_y[0])


def test_the_raw_pixel_floor_is_far_below_the_easy_family() -> None:
    """Measured at 3 × 1,000 tasks (docs/DATASETS.md): typefaces 20.7 % at 20-way 1-shot
    (chance 5 %), glyphs 46 %; here 40 tasks, bounded loosely."""
    family = build_task_family(TypefacesSpec(ways=20, support_shots=1, query_shots=5))
    floor = pixel_floor(family.sample(seed=0, split="test", iteration=0, task_indices=range(40)))
    assert 0.05 < floor < 0.3, floor
