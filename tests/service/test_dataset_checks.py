"""The submit check of an image spec agrees with what the ``images`` family finds when it
starts; descriptions (default split sizes, ``usable_for``) of image and table datasets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from metaserve.service.dataset_checks import check_images, describe, recorded_meta
from metaserve.service.exceptions import DatasetReferenceInvalid
from metaserve.service.image_ingest import images_meta
from metaserve.workers.exceptions import DatasetError
from metaserve.workers.spec import ImagesSpec
from metaserve.workers.tasks.images import ImagesFamily
from metaserve.workers.tasks.table_format import MAX_LISTED_TASKS, write_canonical_table


def _npz(path, class_sizes: list[int]) -> str:
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    np.savez(path, images=np.zeros((len(labels), 8, 8), np.uint8), labels=labels)
    return str(path)


CASES = list(itertools.product(
    [[6] * 10, [2, 9, 3, 8, 4, 7, 5, 6, 3, 9, 2, 8], [4] * 20, [1, 30] * 7],  # class sizes
    [(0.7, 0.15, 0.15), (0.5, 0.25, 0.25)],  # split
    [0, 3],  # split_seed
    [(2, 1, 1), (3, 2, 2), (5, 1, 3), (2, 4, 4)],  # ways, support_shots, query_shots
    [False, True]))  # rotations


@pytest.mark.parametrize(("sizes", "split", "seed", "shots", "rotations"), CASES)
def test_the_submit_check_refuses_exactly_what_the_family_would(
        tmp_path, sizes, split, seed, shots, rotations) -> None:  # noqa: ANN001
    ways, support, query = shots
    spec = ImagesSpec(path=_npz(tmp_path / "d.npz", sizes), ways=ways, support_shots=support,
                      query_shots=query, split=split, split_seed=seed, rotations=rotations,
                      image_size=8)
    try:
        ImagesFamily(spec)
        family_error = None
    except DatasetError as error:
        family_error = str(error)
    meta = images_meta(np.asarray(sizes), [1, 8, 8])
    try:
        check_images(spec, meta)
        check_error = None
    except DatasetReferenceInvalid as error:
        check_error = error.message
    assert (family_error is None) == (check_error is None), (family_error, check_error)


def test_too_few_classes_per_split_names_ways_and_the_numbers() -> None:
    spec = ImagesSpec(dataset="ds_" + "0" * 26, ways=5)
    with pytest.raises(DatasetReferenceInvalid) as raised:
        check_images(spec, images_meta(np.full(27, 20), [1, 28, 28]))
    assert raised.value.details == {"task_family.ways": (
        "val split has 4 classes; ways=5 needs at least 5: upload more classes or change split "
        "(27 classes split [0.7, 0.15, 0.15] with split_seed 0)")}


def test_too_few_images_per_class_names_support_shots_and_the_numbers() -> None:
    spec = ImagesSpec(dataset="ds_" + "0" * 26, ways=5, support_shots=5, query_shots=15)
    with pytest.raises(DatasetReferenceInvalid) as raised:
        check_images(spec, images_meta(np.full(100, 19), [1, 28, 28]))
    assert raised.value.details == {"task_family.support_shots": (
        "train split has 0 classes with at least 20 images (support_shots 5 + query_shots 15); "
        "ways=5 needs 5: classes have 19 to 19 images; lower the shots or upload more images "
        "per class")}


def test_many_classes_are_checked_from_the_histogram_without_a_false_refusal() -> None:
    sizes = np.tile([1, 2, 3, 40], (MAX_LISTED_TASKS + 400) // 4)
    meta = images_meta(sizes, [1, 8, 8])
    assert "class_sizes" not in meta
    check_images(ImagesSpec(dataset="ds_" + "0" * 26, ways=20, support_shots=5,
                            query_shots=15), meta)  # a quarter of every split has 40 images
    with pytest.raises(DatasetReferenceInvalid, match="about 0 classes with at least 41"):
        check_images(ImagesSpec(dataset="ds_" + "0" * 26, ways=5, support_shots=1,
                                query_shots=40), meta)


def test_an_image_dataset_says_what_it_can_serve() -> None:
    assert describe("images", images_meta(np.full(40, 12), [1, 28, 28])) == {
        "split_sizes": {"classes": {"train": 28, "val": 6, "test": 6}},
        "usable_for": ["images 5-way with support_shots + query_shots up to 12 (default split)"],
        "unusable_reason": None}
    described = describe("images", images_meta(np.full(6, 12), [1, 28, 28]))
    assert described["usable_for"] == []
    assert described["unusable_reason"].startswith(
        "the default split ([0.7, 0.15, 0.15] of 6 classes) leaves 1 class(es) in val")


def test_a_table_without_a_task_column_says_why(tmp_path) -> None:
    meta = write_canonical_table(tmp_path, {"id": np.arange(200_000) + 0.5,
                                            "y": np.linspace(0, 1, 200_000)}, source_format="csv")
    described = describe("table", meta)
    assert (described["usable_for"], described["split_sizes"]) == ([], {})
    assert described["unusable_reason"] == (
        'no column can be a task column (category values or integer ids): "id" holds '
        'non-integer numbers; "y" holds non-integer numbers')


def test_long_category_lists_are_shortened_in_the_row_only(tmp_path) -> None:
    names = np.array([f"c{i:05d}" for i in range(1500)], dtype=object)
    meta = write_canonical_table(tmp_path, {"c": names, "y": np.arange(1500.0)},
                                 source_format="csv")
    recorded = recorded_meta(meta)
    assert len(meta["columns"][0]["categories"]) == 1500
    assert recorded["columns"][0]["categories"] == list(names[:1000])
    assert recorded["columns"][0]["categories_truncated"] is True
    assert "tensors_sha256" not in recorded


def test_a_table_of_more_tasks_than_listed_is_described_by_its_smallest_task(tmp_path) -> None:
    tasks = MAX_LISTED_TASKS + 10
    meta = write_canonical_table(tmp_path, {"task": np.repeat(np.arange(tasks), 3),
                                            "x": np.linspace(0, 1, 3 * tasks)},
                                 source_format="csv")
    assert "rows_per_task" not in meta["groups"]["task"]
    assert describe("table", meta)["usable_for"] == [
        'tabular regression with task_column "task" (support_shots + query_shots up to at '
        "least 3 in every split)"]
