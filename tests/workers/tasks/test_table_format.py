"""The canonical table layout, the split of tasks by id, and the spec-vs-metadata check."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metaserve.workers.exceptions import DatasetError, TableSpecInvalid
from metaserve.workers.spec import TabularSpec
from metaserve.workers.tasks.fewshot import split_classes
from metaserve.workers.tasks.table_format import (TABLE_JSON, TABLE_TENSORS, CategoryColumn,
                                                  check_table_spec, read_canonical_table,
                                                  split_task_counts, split_task_ids,
                                                  split_totals,
                                                  write_canonical_table)

DATASET = "ds_" + "0" * 26


def _panel(entities: int = 20, rows: int = 8) -> dict[str, object]:
    """``entities`` tasks of ``rows`` rows: subject (strings), x, y, a constant, a time."""
    rng = np.random.default_rng(0)
    subject = np.repeat([f"s{i:03d}" for i in range(entities)], rows)
    x = rng.normal(size=entities * rows)
    return {"subject": subject.astype(object), "x": x, "y": 2 * x + 1,
            "flat": np.full(entities * rows, 3.0), "t": np.tile(np.arange(rows), entities)}


def test_round_trip_keeps_values_and_describes_columns(tmp_path):
    columns = {"'; DROP TABLE jobs;--": np.array([1.0, np.nan, np.inf, 4.0]),
               "<script>": np.array(["b", None, "a", "b"], dtype=object),
               "id": np.array([7, 7, 3, 3])}
    meta = write_canonical_table(tmp_path, columns, source_format="csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TABLE_JSON, TABLE_TENSORS])
    assert meta["rows"] == 4 and meta["format"] == "csv" and meta["kind"] == "table"
    assert meta["columns"] == [
        {"name": "'; DROP TABLE jobs;--", "type": "number", "missing": 1, "nonfinite": 1,
         "distinct": 2, "min": 1.0, "max": 4.0, "constant": False, "integer": True, "non_numeric": 0},
        {"name": "<script>", "type": "category", "missing": 1, "nonfinite": 0, "distinct": 2,
         "min": None, "max": None, "constant": False, "integer": False,
         "categories": ["a", "b"]},
        {"name": "id", "type": "number", "missing": 0, "nonfinite": 0, "distinct": 2,
         "min": 3.0, "max": 7.0, "constant": False, "integer": True, "non_numeric": 0}]
    assert meta["groups"] == {
        "<script>": {"tasks": 2, "min_rows": 1, "max_rows": 2, "rows_histogram": [[1, 1], [2, 1]],
                     "histogram_binned": False, "missing": 1, "rows_per_task": [1, 2]},
        "id": {"tasks": 2, "min_rows": 2, "max_rows": 2, "rows_histogram": [[2, 2]],
               "histogram_binned": False, "missing": 0, "rows_per_task": [2, 2]}}
    assert meta["not_task_columns"] == {"'; DROP TABLE jobs;--": "holds infinite values"}
    read_meta, values = read_canonical_table(tmp_path)
    assert read_meta["columns"] == meta["columns"]
    np.testing.assert_array_equal(values["'; DROP TABLE jobs;--"], [1.0, np.nan, np.inf, 4.0])
    category = values["<script>"]
    assert category.categories == ["a", "b"]
    np.testing.assert_array_equal(category.codes, [1, -1, 0, 1])
    np.testing.assert_array_equal(values["id"], [7.0, 7.0, 3.0, 3.0])


def test_category_codes_are_sorted_whatever_the_given_order(tmp_path):
    meta = write_canonical_table(tmp_path, {"c": CategoryColumn(np.array([0, 1, -1, 0]),
                                                                ["zeta", "alpha"])},
                                 source_format="parquet")
    _, values = read_canonical_table(tmp_path)
    assert meta["columns"][0]["categories"] == ["alpha", "zeta"]
    np.testing.assert_array_equal(values["c"].codes, [1, 0, -1, 1])


def test_a_changed_tensor_file_is_refused(tmp_path):
    write_canonical_table(tmp_path, {"x": np.arange(4.0)}, source_format="csv")
    data = bytearray((tmp_path / TABLE_TENSORS).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / TABLE_TENSORS).write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="does not match the sha256"):
        read_canonical_table(tmp_path)


def test_many_distinct_task_sizes_are_binned_by_powers_of_two(tmp_path):
    sizes = np.arange(1, 101)  # 100 tasks of 1..100 rows
    meta = write_canonical_table(tmp_path, {"task": np.repeat(np.arange(100), sizes)},
                                 source_format="csv")
    group = meta["groups"]["task"]
    assert group["histogram_binned"] is True
    assert group["rows_histogram"] == [[1, 1], [2, 2], [4, 4], [8, 8], [16, 16], [32, 32],
                                       [64, 37]]
    assert (group["tasks"], group["min_rows"], group["max_rows"]) == (100, 1, 100)


def test_split_task_ids_is_the_class_split_of_the_sorted_distinct_ids():
    ids = np.array(["c", "a", "b", "a", "e", "d", "c", "f", "g", "h"])
    splits = split_task_ids(ids, (0.5, 0.25, 0.25), 3)
    distinct = np.unique(ids)
    positions = split_classes(len(distinct), (0.5, 0.25, 0.25), 3)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(splits[name], distinct[positions[name].numpy()])
    assert sorted(np.concatenate(list(splits.values()))) == list(distinct)
    shuffled = split_task_ids(ids[::-1], (0.5, 0.25, 0.25), 3)
    assert all((shuffled[n] == splits[n]).all() for n in splits)


@pytest.mark.parametrize("tasks", [0, 1, 7, 10, 33, 200])
def test_split_totals_are_the_sizes_of_the_split(tasks):
    for split in ((0.7, 0.15, 0.15), (0.5, 0.25, 0.25), (1.0, 0.0, 0.0)):
        assert split_totals(tasks, split) == {
            name: len(ids) for name, ids in split_classes(tasks, split, 0).items()}


def test_split_task_counts_exact_and_estimated():
    group = {"tasks": 10, "rows_per_task": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
             "rows_histogram": [[r, 1] for r in range(1, 11)], "histogram_binned": False}
    totals, qualifying, exact = split_task_counts(group, (0.6, 0.2, 0.2), 0, 6)
    positions = split_classes(10, (0.6, 0.2, 0.2), 0)
    assert exact and totals == {"train": 6, "val": 2, "test": 2}
    assert qualifying == {n: int((positions[n] + 1 >= 6).sum()) for n in totals}
    del group["rows_per_task"]
    _, estimated, exact = split_task_counts(group, (0.6, 0.2, 0.2), 0, 6)
    assert not exact and estimated == {"train": 3, "val": 1, "test": 1}  # ceil(0.5 × n)


def _meta(tmp_path, **columns):
    return write_canonical_table(tmp_path, columns or _panel(), source_format="csv")


def _spec(**fields) -> TabularSpec:
    return TabularSpec(**{"dataset": DATASET, "task_column": "subject", "target": "y",
                          "support_shots": 3, "query_shots": 3, **fields})


def test_features_default_to_every_other_usable_numeric_column(tmp_path):
    resolved = check_table_spec(_spec(time_column="t"), _meta(tmp_path))
    assert resolved.features == ["x"]  # not flat (constant), not t (time), subject, y
    resolved = check_table_spec(_spec(), _meta(tmp_path))
    assert resolved.features == ["x", "t"]


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"target": "z"}, "task_family.target", 'no column "z" in the table'),
    ({"task_column": "nope"}, "task_family.task_column", 'no column "nope"'),
    ({"task_column": "x"}, "task_family.task_column", "holds non-integer numbers"),
    ({"features": ["flat"]}, "task_family.features", 'column "flat" is constant'),
    ({"support_shots": 5, "query_shots": 4}, "task_family.support_shots",
     "the train split has 14 task(s) of \"subject\" and 0 of them have at least 9 rows "
     "(support_shots 5 + query_shots 4); the largest task has 8 rows"),
    ({"time_column": "t", "lags": 3}, "task_family.support_shots", "+ lags 3"),
    ({"task_column": "t", "time_column": "subject"}, "task_family.time_column", 'column "subject" is a category'),
    ({"task_column": "t", "target": "subject"}, "task_family.target",
     "is a category column; regression needs"),
])
def test_spec_the_table_cannot_serve_names_the_field(tmp_path, fields, field, message):
    with pytest.raises(TableSpecInvalid) as raised:
        check_table_spec(_spec(**fields), _meta(tmp_path))
    assert raised.value.field == field
    assert message in raised.value.message


def test_nan_or_inf_target_is_refused_unless_skipped(tmp_path):
    panel = _panel()
    panel["y"] = panel["y"].copy()
    panel["y"][[3, 5]] = [np.nan, np.inf]
    meta = _meta(tmp_path, **panel)
    with pytest.raises(TableSpecInvalid) as raised:
        check_table_spec(_spec(), meta)
    assert raised.value.field == "task_family.target"
    assert raised.value.message.startswith('column "y" has 1 missing/NaN and 1 infinite value(s)')
    assert check_table_spec(_spec(on_invalid="skip"), meta).features == ["x", "t"]


def test_classification_needs_as_many_classes_as_ways(tmp_path):
    panel = _panel()
    panel["label"] = np.where(panel["x"] > 0, "up", "down").astype(object)
    meta = _meta(tmp_path, **panel)
    spec = _spec(problem="classification", target="label", ways=3)
    with pytest.raises(TableSpecInvalid) as raised:
        check_table_spec(spec, meta)
    assert (raised.value.field, raised.value.message) == (
        "task_family.ways", 'column "label" has 2 class(es) in the whole table; ways=3 needs '
                            "at least 3")
    assert check_table_spec(_spec(problem="classification", target="label", ways=2),
                            meta).features == ["x", "y", "t"]


def test_table_json_is_what_write_returns(tmp_path):
    meta = _meta(tmp_path)
    stored = json.loads((tmp_path / TABLE_JSON).read_text())
    assert stored.pop("canonical_format") == 1
    assert stored == meta
