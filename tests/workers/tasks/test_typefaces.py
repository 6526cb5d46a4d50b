"""The hard built-in family: characters drawn by different fonts, split by script, with the
near-duplicate rule applied, support and query from different fonts, and a raw-pixel
nearest-prototype floor far below the easy ``glyphs`` family's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metaserve.workers.spec import TypefacesSpec
from metaserve.workers.tasks import build_task_family
from metaserve.workers.tasks.typefaces import (DUPLICATE_COSINE, SELECTION_SIZE, render_all, script_of,
                                               split_characters)


def pixel_floor(batch) -> float:  # noqa: ANN001
    """Accuracy of the nearest class mean of raw pixels (no learning)."""
    support_x, support_y, query_x, query_y = batch
    one_hot = F.one_hot(support_y).float()
    prototypes = one_hot.transpose(1, 2) @ support_x.flatten(2) / one_hot.sum(1)[..., None]
    guesses = torch.cdist(query_x.flatten(2), prototypes).argmin(-1)
    return float((guesses == query_y).float().mean())


def test_splits_are_whole_scripts_with_the_documented_counts_and_no_near_duplicates() -> None:
    characters, renders, masks = render_all(SELECTION_SIZE)
    kept, removed = split_characters(0)
    assert {split: len(ids) for split, ids in kept.items()} == {"train": 1286, "val": 345, "test": 327}
    assert removed == {"within_split": 1370, "across_splits": 239}
    scripts = {split: {script_of(characters[i]) for i in ids} for split, ids in kept.items()}
    assert not scripts["train"] & scripts["val"] and not scripts["train"] & scripts["test"]
    assert not scripts["val"] & scripts["test"]
    mean = (renders.float() * masks[:, :, None, None]).sum(1) / masks.sum(1)[:, None, None]
    unit = F.normalize(mean.flatten(1), dim=1)
    for split in ("val", "test"):
        assert float((unit[kept[split]] @ unit[kept["train"]].T).max()) <= DUPLICATE_COSINE
    assert int(masks.sum(1).min()) >= 6 and int(masks.sum(1).max()) == 21


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
    """Measured at 300 tasks (docs/DATASETS.md): typefaces 16 % at 20-way 1-shot (chance 5 %),
    glyphs 46 %; here 40 tasks, bounded loosely."""
    family = build_task_family(TypefacesSpec(ways=20, support_shots=1, query_shots=5))
    floor = pixel_floor(family.sample(seed=0, split="test", iteration=0, task_indices=range(40)))
    assert 0.05 < floor < 0.3, floor
