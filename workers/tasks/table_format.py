"""The canonical layout of an uploaded task-grouped table, the split of its tasks, and the
check of a ``tabular`` spec against its metadata (one definition for the server's submit
check, the engine and ``metaserve train``).

A table dataset is a directory (in the artifact store: under the dataset's id) holding

    table.safetensors   one tensor per column, key ``col/<i>`` for column index i:
                        float64 [rows] for a number column (NaN where missing),
                        int64 [rows] codes for a category column (-1 where missing)
    table.json          the metadata below, and the sha256 of table.safetensors

``table.json``::

    {"kind": "table", "format": "csv" | "parquet", "rows": N,
     "columns": [{"name", "type": "number" | "category", "missing", "nonfinite", "distinct",
                  "min", "max", "constant", "integer", "categories" (category only)}],
     "groups": {<column>: {"tasks", "min_rows", "max_rows", "rows_histogram": [[rows, tasks]],
                           "missing", "rows_per_task" (at most MAX_LISTED_TASKS tasks)}},
     "not_task_columns": {<column>: <why>}, "tensors_sha256": ...}

Column names are data: they are stored and echoed, never interpreted (a column may be named
``'; DROP TABLE jobs;--``); tensors are keyed by index so no name reaches a key.
``missing`` counts empty cells and NaN (one NaN marks both in float64, so they are one
count), and, in a number column, text that is not a number (also counted in ``non_numeric``);
``nonfinite`` counts ±inf. ``min``/``max`` are over finite values. A category
column's ``categories`` are sorted (by code point) and its codes index them, so codes, and the
order of task ids, depend only on the values, never on row order.

``groups`` describes every column that can be a task column: a category column, or a number
column whose present values are all finite integers, with at most ``MAX_GROUP_TASKS``
distinct values (``not_task_columns`` says why another column is not one). A task is a
distinct value; ``rows_per_task`` lists the rows of each task in sorted task order, which is
what :func:`split_task_counts` needs to count, per split, the tasks with enough rows.

Tasks are split train/val/test by task id, never by row (:func:`split_task_ids`), with the
same function as the ``images`` family's classes
(:func:`metaserve.workers.tasks.fewshot.split_classes`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from metaserve.workers.exceptions import DatasetError, TableSpecInvalid

TABLE_TENSORS = "table.safetensors"
TABLE_JSON = "table.json"
TABLE_FILES = (TABLE_TENSORS, TABLE_JSON)
TABLE_KIND = "table"
CANONICAL_TABLE_FORMAT = 1
MAX_GROUP_TASKS = 100_000
"""A column with more distinct values is not a task column (and a category column with more
is refused at upload: its categories are stored in the metadata)."""
MAX_LISTED_TASKS = 20_000
"""``rows_per_task`` is kept for at most this many tasks; above it, per-split counts are
estimated from the histogram (and messages say so)."""
MAX_EXACT_HISTOGRAM = 50
"""At most this many distinct task sizes are listed exactly; more are binned by powers of 2."""


def column_key(index: int) -> str:
    return f"col/{index}"


@dataclass(frozen=True)
class CategoryColumn:
    """A string column as codes into ``categories`` (-1: missing)."""

    codes: np.ndarray
    categories: list[str]

    @classmethod
    def from_values(cls, values: Sequence[Any] | np.ndarray) -> "CategoryColumn":
        """From strings, ``None`` (or NaN) marking a missing value."""
        array = np.asarray(values, dtype=object)
        present = np.array([isinstance(v, str) for v in array], dtype=bool)
        categories, codes = np.unique(array[present].astype(str), return_inverse=True)
        full = np.full(len(array), -1, dtype=np.int64)
        full[present] = codes
        return cls(full, [str(c) for c in categories])

    def sorted(self) -> "CategoryColumn":
        """The same column with categories sorted by code point (codes remapped)."""
        order = sorted(range(len(self.categories)), key=lambda i: self.categories[i])
        if order == list(range(len(self.categories))):
            return CategoryColumn(np.asarray(self.codes, dtype=np.int64), list(self.categories))
        new_code = np.empty(len(order) + 1, dtype=np.int64)
        new_code[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
        new_code[-1] = -1  # code -1 indexes the last slot
        return CategoryColumn(new_code[np.asarray(self.codes, dtype=np.int64)],
                              [self.categories[i] for i in order])


# --------------------------------------------------------------------------- metadata


def _number_meta(name: str, values: np.ndarray) -> tuple[dict[str, Any], np.ndarray | None]:
    nan = np.isnan(values)
    finite = values[np.isfinite(values)]
    distinct_values = np.unique(finite)
    integer = bool(np.all(finite == np.round(finite)))
    meta = {"name": name, "type": "number", "missing": int(nan.sum()),
            "nonfinite": int(len(values) - nan.sum() - len(finite)),
            "distinct": int(len(distinct_values)),
            "min": float(finite.min()) if len(finite) else None,
            "max": float(finite.max()) if len(finite) else None,
            "constant": len(distinct_values) <= 1, "integer": integer}
    return meta, distinct_values


def _category_meta(name: str, column: CategoryColumn) -> dict[str, Any]:
    present = column.codes[column.codes >= 0]
    distinct = int(len(np.unique(present)))
    return {"name": name, "type": "category", "missing": int(len(column.codes) - len(present)),
            "nonfinite": 0, "distinct": distinct, "min": None, "max": None,
            "constant": distinct <= 1, "integer": False, "categories": list(column.categories)}


def _group_sizes(codes: np.ndarray) -> np.ndarray:
    """Rows per task, in sorted task order, of a column of task codes (-1: missing)."""
    present = codes[codes >= 0]
    _, sizes = np.unique(present, return_counts=True)
    return sizes


def size_histogram(sizes: np.ndarray) -> tuple[list[list[int]], bool]:
    """``([[size, count], ...], binned)``: exact for at most ``MAX_EXACT_HISTOGRAM`` distinct
    sizes; else binned by powers of two, each bin named by its lower bound."""
    values, counts = np.unique(sizes, return_counts=True)
    if len(values) <= MAX_EXACT_HISTOGRAM:
        return [[int(v), int(c)] for v, c in zip(values, counts)], False
    bins = np.floor(np.log2(sizes)).astype(np.int64)
    lows, counts = np.unique(bins, return_counts=True)
    return [[int(2 ** low), int(c)] for low, c in zip(lows, counts)], True


def _groups(sizes: np.ndarray, missing: int) -> dict[str, Any]:
    histogram, binned = size_histogram(sizes)
    group: dict[str, Any] = {
        "tasks": int(len(sizes)), "min_rows": int(sizes.min()) if len(sizes) else 0,
        "max_rows": int(sizes.max()) if len(sizes) else 0, "rows_histogram": histogram,
        "histogram_binned": binned, "missing": int(missing)}
    if len(sizes) <= MAX_LISTED_TASKS:
        group["rows_per_task"] = [int(s) for s in sizes]
    return group


def table_metadata(columns: Mapping[str, np.ndarray | CategoryColumn], *,
                   source_format: str, non_numeric: Mapping[str, int] | None = None
                   ) -> dict[str, Any]:
    """The metadata of a table (see the module docstring); ``columns`` as
    :func:`write_canonical_table` takes them, already normalized."""
    lengths = {len(c.codes) if isinstance(c, CategoryColumn) else len(c) for c in columns.values()}
    if len(lengths) > 1:
        raise DatasetError(f"columns of different lengths {sorted(lengths)}")
    rows = lengths.pop() if lengths else 0
    described: list[dict[str, Any]] = []
    groups: dict[str, Any] = {}
    not_task: dict[str, str] = {}
    for name, column in columns.items():
        if isinstance(column, CategoryColumn):
            meta = _category_meta(name, column)
            codes = column.codes
        else:
            meta, distinct_values = _number_meta(name, column)
            meta["non_numeric"] = int((non_numeric or {}).get(name, 0))
            codes = None
            if meta["nonfinite"]:
                not_task[name] = "holds infinite values"
            elif not meta["integer"]:
                not_task[name] = "holds non-integer numbers"
            elif meta["distinct"] <= MAX_GROUP_TASKS:
                present = ~np.isnan(column)
                codes = np.full(len(column), -1, dtype=np.int64)
                codes[present] = np.searchsorted(distinct_values, column[present])
        described.append(meta)
        if codes is None:
            continue
        if meta["distinct"] > MAX_GROUP_TASKS:
            not_task[name] = f"{meta['distinct']:,} distinct values, more than {MAX_GROUP_TASKS:,}"
            continue
        groups[name] = _groups(_group_sizes(codes), meta["missing"])
    return {"kind": TABLE_KIND, "format": source_format, "rows": int(rows), "columns": described,
            "groups": groups, "not_task_columns": not_task}


def _normalize(column: np.ndarray | CategoryColumn | Sequence[Any]) -> np.ndarray | CategoryColumn:
    if isinstance(column, CategoryColumn):
        return column.sorted()
    array = np.asarray(column)
    if array.dtype.kind in "biuf":
        return array.astype(np.float64)
    if array.dtype.kind in "UO":
        return CategoryColumn.from_values(array)
    raise DatasetError(f"a column of dtype {array.dtype} is neither numbers nor strings")


def write_canonical_table(directory: str | Path, columns: Mapping[str, Any], *,
                          source_format: str, non_numeric: Mapping[str, int] | None = None
                          ) -> dict[str, Any]:
    """Write ``table.safetensors`` and ``table.json`` for ``columns`` (name → a numeric numpy
    array, NaN for missing; a :class:`CategoryColumn`; or an array of strings with ``None``
    for missing) in ``directory``, and return the metadata (as ``table.json`` holds it).
    ``non_numeric``: per number column, the cells of the source that were text other than
    numbers, stored as missing (so counted in ``missing`` too)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    normalized = {name: _normalize(column) for name, column in columns.items()}
    meta = table_metadata(normalized, source_format=source_format, non_numeric=non_numeric)
    tensors = {column_key(i): np.ascontiguousarray(
        c.codes if isinstance(c, CategoryColumn) else c)
        for i, c in enumerate(normalized.values())}
    save_file(tensors, str(directory / TABLE_TENSORS),
              metadata={"format": str(CANONICAL_TABLE_FORMAT), "kind": TABLE_KIND})
    meta["tensors_sha256"] = _sha256(directory / TABLE_TENSORS)
    (directory / TABLE_JSON).write_text(json.dumps({"canonical_format": CANONICAL_TABLE_FORMAT,
                                                    **meta}, indent=1))
    return meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_canonical_table(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, {column name: values})`` of a canonical table directory: a number column as
    float64 (NaN where missing), a category column as a :class:`CategoryColumn` (int64 codes,
    -1 where missing, into its sorted ``categories``), in the table's column order."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    meta = json.loads((directory / TABLE_JSON).read_text())
    if meta.get("kind") != TABLE_KIND or meta.get("canonical_format") != CANONICAL_TABLE_FORMAT:
        raise DatasetError(f"{directory}: not a canonical table (kind {meta.get('kind')!r}, "
                           f"format {meta.get('canonical_format')!r})")
    if _sha256(directory / TABLE_TENSORS) != meta["tensors_sha256"]:
        raise DatasetError(f"{directory}: {TABLE_TENSORS} does not match the sha256 recorded "
                           "at upload")
    tensors = load_file(str(directory / TABLE_TENSORS))
    values: dict[str, Any] = {}
    for index, column in enumerate(meta["columns"]):
        data = tensors[column_key(index)]
        values[column["name"]] = (CategoryColumn(data, list(column["categories"]))
                                  if column["type"] == "category" else data)
    return meta, values


# --------------------------------------------------------------------------- splits of tasks


def split_positions(tasks: int, split: Sequence[float], split_seed: int) -> dict[str, np.ndarray]:
    """Positions ``0..tasks-1`` of the sorted task ids in each of train/val/test: the
    ``images`` family's class split (:func:`~metaserve.workers.tasks.fewshot.split_classes`),
    so tasks, like classes, never cross splits and the result depends only on
    ``(tasks, split, split_seed)``."""
    from metaserve.workers.tasks.fewshot import split_classes

    fractions = (float(split[0]), float(split[1]), float(split[2]))
    return {name: positions.numpy() for name, positions
            in split_classes(tasks, fractions, split_seed).items()}


def split_totals(tasks: int, split: Sequence[float]) -> dict[str, int]:
    """How many of ``tasks`` each split gets: :func:`split_positions`' cut points, without
    drawing the permutation (which a million classes would make a large allocation)."""
    train_end = round(float(split[0]) * tasks)
    val_end = round((float(split[0]) + float(split[1])) * tasks)
    return {"train": train_end, "val": val_end - train_end, "test": tasks - val_end}


def split_task_ids(task_ids: Sequence[Any] | np.ndarray, split: Sequence[float],
                   split_seed: int) -> dict[str, np.ndarray]:
    """The distinct ``task_ids`` (any order, repeats allowed) of each split, by task id, never
    by row: the sorted distinct ids at :func:`split_positions`."""
    distinct = np.unique(np.asarray(task_ids))
    return {name: distinct[positions]
            for name, positions in split_positions(len(distinct), split, split_seed).items()}


def split_task_counts(group: Mapping[str, Any], split: Sequence[float], split_seed: int,
                      min_rows: int) -> tuple[dict[str, int], dict[str, int], bool]:
    """``(tasks per split, tasks with at least min_rows rows per split, exact)`` of a task
    column's ``groups`` entry. Exact where ``rows_per_task`` is listed; else the tasks
    qualifying are the split's share of those qualifying in the histogram (``exact`` False)."""
    tasks = int(group["tasks"])
    totals = split_totals(tasks, split)
    if "rows_per_task" in group:
        positions = split_positions(tasks, split, split_seed)
        rows = np.asarray(group["rows_per_task"], dtype=np.int64)
        return totals, {name: int((rows[p] >= min_rows).sum())
                        for name, p in positions.items()}, True
    # A binned histogram's rows is a bin's lower bound (the bin holds low..2·low-1 rows): a
    # bin that may hold qualifying tasks counts whole, and the split's share is rounded up, so
    # an estimate never refuses a spec that the exact counts would accept.
    binned = bool(group.get("histogram_binned"))
    qualifying = sum(count for rows, count in group["rows_histogram"]
                     if (2 * rows - 1 if binned else rows) >= min_rows)
    share = qualifying / tasks if tasks else 0.0
    return totals, {name: int(math.ceil(share * total)) for name, total in totals.items()}, False


# --------------------------------------------------------------------------- spec vs metadata


def _column(meta: Mapping[str, Any], name: str, field: str) -> dict[str, Any]:
    for column in meta["columns"]:
        if column["name"] == name:
            return column
    names = [c["name"] for c in meta["columns"]]
    shown = ", ".join(json.dumps(n) for n in names[:20]) + (" ..." if len(names) > 20 else "")
    raise TableSpecInvalid(field, f"no column {json.dumps(name)} in the table (its columns: "
                                  f"{shown})")


def _check_values(column: Mapping[str, Any], field: str, skip: bool) -> None:
    bad = int(column["missing"]) + int(column["nonfinite"])
    if not bad:
        return
    text = column.get("non_numeric", 0)
    what = (f"{column['missing']:,} missing/NaN{f' (of them {text:,} not numbers)' if text else ''}"
            f" and {column['nonfinite']:,} infinite value(s)")
    if not skip:
        raise TableSpecInvalid(field, f"column {json.dumps(column['name'])} has {what}; clean "
                                      "them, or set on_invalid: skip to drop those rows")


def check_table_spec(spec: Any, meta: Mapping[str, Any]) -> Any:
    """Check a ``tabular`` task family spec against its table's metadata and return it
    resolved (``features: null`` → the explicit list of every other numeric, non-constant
    column without missing values, the task, time and target columns excluded).

    Raises :class:`TableSpecInvalid` naming the field (``task_family.target``, ...) and the
    numbers. What it cannot see (classes per task for classification, rows per task once
    rows with missing values are dropped under ``on_invalid: skip``) is checked when the
    tasks are built."""
    skip = spec.on_invalid == "skip"
    task = _column(meta, spec.task_column, "task_family.task_column")
    if spec.task_column not in meta["groups"]:
        why = meta.get("not_task_columns", {}).get(spec.task_column, "")
        raise TableSpecInvalid("task_family.task_column", (
            f"column {json.dumps(spec.task_column)} cannot group rows into tasks"
            f"{': it ' + why if why else ''}; a task column holds category values or "
            "integer ids"))
    targets = spec.targets  # the spec itself refuses a column used twice
    excluded = {spec.task_column, *targets}
    if spec.time_column is not None:
        time = _column(meta, spec.time_column, "task_family.time_column")
        if time["type"] != "number":
            raise TableSpecInvalid("task_family.time_column", (
                f"column {json.dumps(spec.time_column)} is a category column; a time column "
                "holds numbers (e.g. seconds or days since an origin)"))
        _check_values(time, "task_family.time_column", skip)
        excluded.add(spec.time_column)
    for target_name in targets:
        target = _column(meta, target_name, "task_family.target")
        if spec.problem == "regression" and target["type"] != "number":
            raise TableSpecInvalid("task_family.target", (
                f"column {json.dumps(target_name)} is a category column; regression needs a "
                "number column (or set problem: classification)"))
        _check_values(target, "task_family.target", skip)
        if spec.problem == "classification":
            ways = spec.ways
            if target["distinct"] < ways:
                raise TableSpecInvalid("task_family.ways", (
                    f"column {json.dumps(target_name)} has {target['distinct']} class(es) in "
                    f"the whole table; ways={ways} needs at least {ways}"))
        elif target["constant"]:
            raise TableSpecInvalid("task_family.target", (
                f"column {json.dumps(target_name)} is constant: there is nothing to predict"))
    if spec.features is None:
        features = [c["name"] for c in meta["columns"]
                    if c["type"] == "number" and c["name"] not in excluded
                    and not c["constant"] and not c["missing"] and not c["nonfinite"]]
        if not features and not spec.lags:
            raise TableSpecInvalid("task_family.features", (
                "no numeric, non-constant column without missing values is left as a feature "
                "once the task, time and target columns are taken out"))
    else:
        features = list(spec.features)
        for name in features:
            column = _column(meta, name, "task_family.features")
            if column["type"] != "number":
                raise TableSpecInvalid("task_family.features", (
                    f"column {json.dumps(name)} is a category column; features are numbers"))
            if column["constant"]:
                raise TableSpecInvalid("task_family.features", (
                    f"column {json.dumps(name)} is constant (one value in every row): it "
                    "tells tasks nothing; leave it out"))
            _check_values(column, "task_family.features", skip)
    needed = spec.support_shots + spec.query_shots + spec.lags
    _check_rows_per_task(spec, meta["groups"][spec.task_column], needed, skip, task["name"])
    return spec.model_copy(update={"features": features})


def _check_rows_per_task(spec: Any, group: Mapping[str, Any], needed: int, skip: bool,
                         task_column: str) -> None:
    if spec.problem == "classification":
        return  # shots are per class: counted per task when the tasks are built
    totals, qualifying, exact = split_task_counts(group, spec.split, spec.split_seed, needed)
    for split_name in ("train", "val", "test"):
        if qualifying[split_name] >= 1:
            continue
        about = "" if exact else "about "
        raise TableSpecInvalid("task_family.support_shots", (
            f"the {split_name} split has {totals[split_name]:,} task(s) of "
            f"{json.dumps(task_column)} and {about}{qualifying[split_name]:,} of them have at "
            f"least {needed} rows (support_shots {spec.support_shots} + query_shots "
            f"{spec.query_shots}{f' + lags {spec.lags}' if spec.lags else ''}); the largest "
            f"task has {group['max_rows']:,} rows: lower the shots or change split"))
