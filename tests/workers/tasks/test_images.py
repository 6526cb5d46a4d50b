from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaserve.workers.spec import ImagesSpec
from metaserve.workers.tasks.images import DatasetError, ImagesFamily, detect_layout, load_image_dataset

SPLITS = ("train", "val", "test")
NUM_CLASSES = 40  # in every dataset conftest.py generates
IMAGES_PER_CLASS = 6


def family(path: Path, **fields) -> ImagesFamily:
    fields = {"ways": 5, "support_shots": 1, "query_shots": 3, "image_size": 16, **fields}
    return ImagesFamily(ImagesSpec(path=str(path), **fields))


def sampled_classes(fam: ImagesFamily, split: str, decode_episodes, tasks: int = 40) -> set[tuple[int, int]]:
    """(class id, quarter turns) of every class seen in ``tasks`` episodes of ``split``."""
    batch = fam.sample(seed=3, split=split, iteration=0, task_indices=range(tasks))
    return {(c, turns) for episode in decode_episodes(batch, fam.spec.ways)
            for images in episode.values() for c, _, turns in images}


def test_omniglot_layout_gives_batches_of_the_documented_shapes_and_types(omniglot_tree):
    fam = family(omniglot_tree, support_shots=2, query_shots=3)
    batch = fam.sample(seed=0, split="train", iteration=0, task_indices=[0, 1, 2, 3])

    assert detect_layout(omniglot_tree) == "omniglot"
    assert (fam.input_shape, fam.output_dim, fam.is_classification) == ((1, 16, 16), 5, True)
    assert [tuple(t.shape) for t in batch] == [(4, 10, 1, 16, 16), (4, 10), (4, 15, 1, 16, 16), (4, 15)]
    assert [t.dtype for t in batch] == [torch.float32, torch.long, torch.float32, torch.long]
    assert 0.0 <= batch.support_x.min() and batch.support_x.max() <= 1.0
    for task in range(4):
        assert Counter(batch.support_y[task].tolist()) == {label: 2 for label in range(5)}
        assert Counter(batch.query_y[task].tolist()) == {label: 3 for label in range(5)}


def test_every_label_is_one_class_with_distinct_images(omniglot_tree, decode_episodes):
    fam = family(omniglot_tree, support_shots=2, query_shots=4)
    batch = fam.sample(seed=1, split="train", iteration=5, task_indices=range(8))

    for episode in decode_episodes(batch, ways=5):
        classes = [{c for c, _, _ in images} for images in episode.values()]
        assert all(len(c) == 1 for c in classes)
        assert len(set.union(*classes)) == 5
        for images in episode.values():
            assert len({instance for _, instance, _ in images}) == 6
            assert all(turns == 0 for _, _, turns in images)


def test_labels_are_a_random_permutation_of_the_chosen_classes(omniglot_tree):
    fam = family(omniglot_tree)
    batch = fam.sample(seed=0, split="train", iteration=0, task_indices=range(20))

    orders = {tuple(task.tolist()) for task in batch.support_y}
    assert len(orders) > 10


def test_sampling_is_a_pure_function_of_seed_split_iteration_and_task(omniglot_tree):
    first = family(omniglot_tree).sample(seed=7, split="train", iteration=3, task_indices=[0, 1, 2])
    again = family(omniglot_tree).sample(seed=7, split="train", iteration=3, task_indices=[0, 1, 2])
    alone = family(omniglot_tree).sample(seed=7, split="train", iteration=3, task_indices=[2])
    next_iteration = family(omniglot_tree).sample(seed=7, split="train", iteration=4, task_indices=[0, 1, 2])
    other_seed = family(omniglot_tree).sample(seed=8, split="train", iteration=3, task_indices=[0, 1, 2])

    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a[2:], b) for a, b in zip(first, alone))
    assert not torch.equal(first.support_x, next_iteration.support_x)
    assert not torch.equal(first.support_x, other_seed.support_x)


def test_splits_hold_disjoint_classes_in_the_configured_proportions(omniglot_tree, decode_episodes):
    fam = family(omniglot_tree)
    seen = {split: {c for c, _ in sampled_classes(fam, split, decode_episodes)} for split in SPLITS}

    assert [fam.classes(split) for split in SPLITS] == [28, 6, 6]
    assert [len(seen[split]) for split in SPLITS] == [28, 6, 6]
    assert seen["train"].isdisjoint(seen["val"]) and seen["train"].isdisjoint(seen["test"])
    assert seen["val"].isdisjoint(seen["test"])
    assert set.union(*seen.values()) == set(range(NUM_CLASSES))


def test_split_seed_changes_which_classes_are_held_out(omniglot_tree, decode_episodes):
    held_out = {
        seed: {c for c, _ in sampled_classes(family(omniglot_tree, split_seed=seed), "test", decode_episodes)}
        for seed in (0, 1)
    }

    assert held_out[0] != held_out[1]


def test_rotations_make_four_classes_of_each_class_without_crossing_splits(omniglot_tree, decode_episodes):
    plain = family(omniglot_tree)
    rotated = family(omniglot_tree, rotations=True)
    seen = {split: sampled_classes(rotated, split, decode_episodes, tasks=200) for split in SPLITS}

    assert [rotated.classes(split) for split in SPLITS] == [4 * plain.classes(split) for split in SPLITS]
    assert len(seen["train"]) == 4 * 28
    for split in SPLITS:
        assert {c for c, _ in seen[split]} == {c for c, _ in sampled_classes(plain, split, decode_episodes)}
        assert {turns for _, turns in seen[split]} == {0, 1, 2, 3}
    batch = rotated.sample(seed=0, split="train", iteration=0, task_indices=range(10))
    for episode in decode_episodes(batch, ways=5):
        classes = [{(c, turns) for c, _, turns in images} for images in episode.values()]
        assert all(len(c) == 1 for c in classes) and len(set.union(*classes)) == 5


def test_imagefolder_layout_reads_png_and_jpeg(imagefolder_tree, decode_episodes):
    fam = family(imagefolder_tree, support_shots=3, query_shots=3)
    batch = fam.sample(seed=0, split="train", iteration=0, task_indices=range(6))

    assert detect_layout(imagefolder_tree) == "imagefolder"
    assert fam.dataset.class_names == tuple(f"class_{c:02d}" for c in range(NUM_CLASSES))
    assert fam.dataset.class_sizes.tolist() == [IMAGES_PER_CLASS] * NUM_CLASSES
    for episode in decode_episodes(batch, ways=5):
        for images in episode.values():
            assert len({c for c, _, _ in images}) == 1
            assert sorted(instance for _, instance, _ in images) == list(range(IMAGES_PER_CLASS))


@pytest.mark.parametrize("archive", ["npz_gray", "npz_rgb"])
@pytest.mark.parametrize("channels", [1, 3])
def test_npz_archives_of_gray_and_rgb_images_give_the_requested_channels(
    archive, channels, request, decode_episodes
):
    path = request.getfixturevalue(archive)
    fam = family(path, channels=channels, query_shots=5)
    batch = fam.sample(seed=0, split="val", iteration=0, task_indices=range(4))

    assert detect_layout(path) == "npz"
    assert fam.dataset.class_names == tuple(str(100 + c) for c in range(NUM_CLASSES))
    assert fam.input_shape == (channels, 16, 16)
    assert batch.query_x.shape == (4, 25, channels, 16, 16)
    assert torch.equal(batch.query_x, batch.query_x[:, :, :1].expand_as(batch.query_x))
    for episode in decode_episodes(batch, ways=5):
        for images in episode.values():
            assert len({c for c, _, _ in images}) == 1
            assert sorted(instance for _, instance, _ in images) == list(range(IMAGES_PER_CLASS))


@pytest.mark.parametrize("archive", ["omniglot_tree", "npz_gray"])
def test_images_are_resized_to_image_size(archive, request):
    fam = family(request.getfixturevalue(archive), image_size=8, channels=3)
    batch = fam.sample(seed=0, split="train", iteration=0, task_indices=[0])

    assert fam.dataset.images.shape == (NUM_CLASSES * IMAGES_PER_CLASS, 3, 8, 8)
    assert batch.support_x.shape == (1, 5, 3, 8, 8)


def test_support_shots_argument_overrides_the_spec(omniglot_tree):
    batch = family(omniglot_tree).sample(seed=0, split="test", iteration=0, task_indices=[0, 1],
                                         support_shots=3)

    assert [tuple(t.shape) for t in batch] == [(2, 15, 1, 16, 16), (2, 15), (2, 15, 1, 16, 16), (2, 15)]


def test_empty_task_list_gives_empty_batch(omniglot_tree):
    batch = family(omniglot_tree).sample(seed=0, split="train", iteration=0, task_indices=[])

    assert [tuple(t.shape) for t in batch] == [(0, 5, 1, 16, 16), (0, 5), (0, 15, 1, 16, 16), (0, 15)]


def test_dataset_is_loaded_once_per_process(omniglot_tree):
    first = load_image_dataset(omniglot_tree, image_size=16, channels=1)

    assert load_image_dataset(omniglot_tree, image_size=16, channels=1) is first
    assert load_image_dataset(omniglot_tree, image_size=8, channels=1) is not first


def test_missing_path_is_a_dataset_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-dataset"

    with pytest.raises(DatasetError, match=re.escape(f"dataset path '{missing}' does not exist")):
        family(missing)


def test_directory_without_images_is_a_dataset_error(tmp_path):
    (tmp_path / "class_a").mkdir()
    (tmp_path / "class_a" / "notes.txt").write_text("not an image")

    with pytest.raises(DatasetError) as error:
        family(tmp_path)
    assert str(error.value) == (
        f"dataset path '{tmp_path}' holds no images in class/*.png (ImageFolder) "
        f"or alphabet/character/*.png (Omniglot) folders"
    )


def test_unreadable_image_is_a_dataset_error_naming_the_file(tmp_path):
    for c in range(3):
        (tmp_path / f"class_{c}").mkdir()
    broken = tmp_path / "class_0" / "broken.png"
    broken.write_bytes(b"not a png")

    with pytest.raises(DatasetError, match=re.escape(f"image '{broken}' cannot be read")):
        family(tmp_path)


def test_layout_that_does_not_match_the_path_is_a_dataset_error(omniglot_tree, npz_gray):
    with pytest.raises(DatasetError, match=re.escape(f"dataset path '{omniglot_tree}' is not an .npz file")):
        family(omniglot_tree, layout="npz")
    not_omniglot = re.escape(f"dataset path '{npz_gray}' is not a directory in the omniglot layout")
    with pytest.raises(DatasetError, match=not_omniglot):
        family(npz_gray, layout="omniglot")


def test_split_with_fewer_classes_than_ways_is_a_dataset_error(omniglot_tree):
    with pytest.raises(DatasetError) as error:
        family(omniglot_tree, ways=7)
    assert str(error.value) == (
        f"dataset path '{omniglot_tree}': the val split has 6 classes, fewer than ways=7 "
        f"(40 classes split (0.7, 0.15, 0.15))"
    )


def test_classes_with_too_few_images_for_the_shots_are_a_dataset_error(omniglot_tree):
    with pytest.raises(DatasetError) as error:
        family(omniglot_tree, support_shots=2, query_shots=5)
    assert str(error.value) == (
        f"dataset path '{omniglot_tree}': the train split has only 0 classes with at least 7 images "
        f"(support + query shots), fewer than ways=5"
    )


def test_classes_too_small_for_the_shots_are_left_out_of_sampling_with_a_warning(tmp_path, caplog):
    for c in range(20):
        (tmp_path / f"class_{c:02d}").mkdir()
        for i in range(2 if c < 2 else 4):
            Image.new("L", (8, 8), color=10 * c).save(tmp_path / f"class_{c:02d}" / f"{i}.png")
    fam = family(tmp_path, ways=2, support_shots=1, query_shots=3, image_size=8, split=(0.6, 0.2, 0.2))
    levels = set()
    for split in SPLITS:
        batch = fam.sample(seed=0, split=split, iteration=0, task_indices=range(40))
        levels |= set((batch.query_x[:, :, 0, 0, 0] * 255).round().int().flatten().tolist())

    assert [fam.classes(split) for split in SPLITS] == [12, 4, 4]
    assert levels == {10 * c for c in range(2, 20)}
    assert any("fewer than 4 images and are not sampled" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"images": np.zeros((4, 8, 8), np.uint8)}, "arrays ['labels'] are missing (it has ['images'])"),
        ({"images": np.zeros((4, 8, 8), np.float32), "labels": np.zeros(4, np.int64)},
         "images must be uint8 [N,H,W] or [N,C,H,W], got float32 of shape [4, 8, 8]"),
        ({"images": np.zeros((4, 2, 8, 8), np.uint8), "labels": np.zeros(4, np.int64)},
         "images [N,C,H,W] must have 1 or 3 channels, got shape [4, 2, 8, 8]"),
        ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, np.int64)},
         "labels must be integers or strings of shape [4], got int64 of shape [3]"),
    ],
)
def test_malformed_npz_is_a_dataset_error_saying_what_is_wrong(tmp_path, arrays, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)

    with pytest.raises(DatasetError) as error:
        family(path)
    assert str(error.value) == f"npz file '{path}': {problem}"
