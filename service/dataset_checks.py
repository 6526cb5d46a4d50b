"""What a dataset's stored metadata says about the jobs it can serve: the check of a spec at
submit (a 422 naming the field and the numbers instead of a job that fails when it starts),
and, for ``GET /v1/datasets/{id}``, the sizes of the default split and ``usable_for``.

Classes (images) and tasks (tables) are split with the very functions the workers use
(:func:`metaserve.workers.tasks.fewshot.split_classes`, through
:func:`metaserve.workers.tasks.table_format.split_task_counts`), so the numbers here are the
numbers a job would meet. A table spec is checked by
:func:`metaserve.workers.tasks.table_format.check_table_spec`, the function the engine runs
too. Datasets recorded before their metadata was (``meta`` null) are checked when the job runs.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from metaserve.service.exceptions import DatasetReferenceInvalid
from metaserve.workers.exceptions import TableSpecInvalid
from metaserve.workers.tasks.base import SPLITS
from metaserve.workers.tasks.table_format import check_table_spec, split_task_counts

DEFAULT_SPLIT = (0.7, 0.15, 0.15)
DEFAULT_SPLIT_SEED = 0
ROTATIONS = 4
MAX_RECORDED_CATEGORIES = 1_000
"""A category column's categories are kept in the database row up to this many (all of them
are in the stored ``table.json``)."""
MAX_DESCRIBED_TASK_COLUMNS = 10


def _invalid(field: str, message: str) -> DatasetReferenceInvalid:
    return DatasetReferenceInvalid(f"{field}: {message}", **{field: message})


def recorded_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata kept in the dataset's row: a table's long category lists shortened."""
    recorded = dict(meta)
    recorded.pop("tensors_sha256", None)
    if meta.get("kind") == "table":
        columns = []
        for column in meta["columns"]:
            column = dict(column)
            if len(column.get("categories", ())) > MAX_RECORDED_CATEGORIES:
                column["categories"] = column["categories"][:MAX_RECORDED_CATEGORIES]
                column["categories_truncated"] = True
            columns.append(column)
        recorded["columns"] = columns
    return recorded


# --------------------------------------------------------------------------- images


def _image_groups(meta: Mapping[str, Any]) -> dict[str, Any]:
    """An image dataset's classes in the shape of a table's task group (a class is a task)."""
    per_class = meta["images_per_class"]
    group: dict[str, Any] = {"tasks": meta["classes"], "max_rows": per_class["max"],
                             "rows_histogram": per_class["histogram"],
                             "histogram_binned": per_class["histogram_binned"]}
    if "class_sizes" in meta:
        group["rows_per_task"] = meta["class_sizes"]
    return group


def check_images(family: Any, meta: Mapping[str, Any]) -> None:
    """Classes per split >= ways, then classes with >= support + query images per split >=
    ways, as :class:`metaserve.workers.tasks.images.ImagesFamily` would find when it starts."""
    turns = ROTATIONS if family.rotations else 1
    shots = family.support_shots + family.query_shots
    totals, qualifying, exact = split_task_counts(_image_groups(meta), family.split,
                                                  family.split_seed, shots)
    where = (f"{meta['classes']:,} classes split {list(family.split)} with split_seed "
             f"{family.split_seed}{', ×4 rotations' if family.rotations else ''}")
    for split in SPLITS:
        classes = totals[split] * turns
        if classes < family.ways:
            raise _invalid("task_family.ways", (
                f"{split} split has {classes:,} classes; ways={family.ways} needs at least "
                f"{family.ways}: upload more classes or change split ({where})"))
    for split in SPLITS:
        classes = qualifying[split] * turns
        if classes < family.ways:
            about = "" if exact else "about "
            per_class = meta["images_per_class"]
            raise _invalid("task_family.support_shots", (
                f"{split} split has {about}{classes:,} classes with at least {shots} images "
                f"(support_shots {family.support_shots} + query_shots {family.query_shots}); "
                f"ways={family.ways} needs {family.ways}: classes have {per_class['min']:,} to "
                f"{per_class['max']:,} images; lower the shots or upload more images per class"))


def check_family(family: Any, *, kind: str, meta: Mapping[str, Any] | None) -> Any:
    """Check a task family spec naming a dataset against the dataset's ``kind`` and ``meta``;
    the family resolved (a table's features), or a 422 naming the field."""
    if family.name == "images":
        if kind != "images":
            raise _invalid("task_family.dataset", (
                f"{family.dataset} is a table; name it with task_family {{name: tabular, "
                "task_column: ..., target: ...}}"))
        if meta is not None:
            check_images(family, meta)
        return family
    if kind != "table":
        raise _invalid("task_family.dataset", (
            f"{family.dataset} is an image dataset; the tabular family reads a table (a CSV "
            "or Parquet upload)"))
    if meta is None:
        return family
    try:
        return check_table_spec(family, meta)
    except TableSpecInvalid as error:
        raise _invalid(error.field, error.message) from None


# --------------------------------------------------------------------------- descriptions


def _largest_usable(rows_per_task: list[int], ways: int, split: tuple[float, float, float],
                    split_seed: int) -> int:
    """The largest ``n`` such that every split has ``ways`` tasks (classes) of >= n rows."""
    from metaserve.workers.tasks.table_format import split_positions

    sizes = np.asarray(rows_per_task, dtype=np.int64)
    largest = []
    for positions in split_positions(len(sizes), split, split_seed).values():
        if len(positions) < ways:
            return 0
        largest.append(int(np.sort(sizes[positions])[-ways]))
    return min(largest)


def describe(kind: str, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"split_sizes", "usable_for", "unusable_reason"}`` for the default split
    (``DEFAULT_SPLIT``, seed 0): what the dataset can serve before any spec names it."""
    if meta is None:
        return {"split_sizes": None, "usable_for": None,
                "unusable_reason": "uploaded before datasets were described; specs naming it "
                                   "are checked when the job runs"}
    if kind == "images":
        return _describe_images(meta)
    return _describe_table(meta)


def _describe_images(meta: Mapping[str, Any]) -> dict[str, Any]:
    totals, _, _ = split_task_counts(_image_groups(meta), DEFAULT_SPLIT, DEFAULT_SPLIT_SEED, 1)
    described: dict[str, Any] = {"split_sizes": {"classes": totals}, "usable_for": [],
                                 "unusable_reason": None}
    ways = min(5, min(totals.values()))
    if ways < 2:
        smallest = min(totals, key=totals.get)
        described["unusable_reason"] = (
            f"the default split ({list(DEFAULT_SPLIT)} of {meta['classes']:,} classes) leaves "
            f"{totals[smallest]} class(es) in {smallest}; few-shot tasks need at least 2: "
            "upload more classes")
        return described
    if "class_sizes" in meta:
        shots = _largest_usable(meta["class_sizes"], ways, DEFAULT_SPLIT, DEFAULT_SPLIT_SEED)
        bound = "up to"
    else:
        shots, bound = meta["images_per_class"]["min"], "up to at least"
    if shots < 2:
        described["unusable_reason"] = (
            f"fewer than {ways} classes of some split have 2 images (one support, one query): "
            "upload more images per class")
        return described
    described["usable_for"] = [f"images {ways}-way with support_shots + query_shots {bound} "
                               f"{shots} (default split)"]
    return described


def _describe_table(meta: Mapping[str, Any]) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    usable: list[str] = []
    columns = meta["columns"]
    for name, group in list(meta["groups"].items())[:MAX_DESCRIBED_TASK_COLUMNS]:
        totals, _, _ = split_task_counts(group, DEFAULT_SPLIT, DEFAULT_SPLIT_SEED, 1)
        sizes[name] = {"tasks": totals}
        if min(totals.values()) < 1:
            continue
        if "rows_per_task" in group:
            rows = _largest_usable(group["rows_per_task"], 1, DEFAULT_SPLIT, DEFAULT_SPLIT_SEED)
            sizes[name]["max_rows_per_split"] = rows
            bound = "up to"
        else:  # too many tasks to list: every task has min_rows rows, a lower bound
            rows, bound = group["min_rows"], "up to at least"
        if rows < 2:
            continue
        others = [c for c in columns if c["name"] != name]
        quoted = json.dumps(name)
        if any(c["type"] == "number" and not c["constant"] for c in others):
            usable.append(f"tabular regression with task_column {quoted} (support_shots + "
                          f"query_shots {bound} {rows} in every split)")
        if any(c["type"] == "category" and c["distinct"] >= 2 for c in others):
            usable.append(f"tabular classification with task_column {quoted}")
    reason = None
    if not usable:
        reason = ("no column groups the rows into tasks with at least 2 rows in every split of "
                  f"the default split ({list(DEFAULT_SPLIT)} of the tasks), beside a column to "
                  "predict" if meta["groups"] else
                  "no column can be a task column (category values or integer ids): "
                  + "; ".join(f"{json.dumps(n)} {why}"
                              for n, why in list(meta.get("not_task_columns", {}).items())[:5]))
    return {"split_sizes": sizes, "usable_for": usable, "unusable_reason": reason}
