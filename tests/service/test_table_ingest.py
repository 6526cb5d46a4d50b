"""CSV and Parquet conversion in-process (the server runs it in a child): column types,
missing and non-numeric cells, and the refusals that name a line or a column."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metaserve.service.exceptions import DatasetLimitExceeded, InvalidDataset
from metaserve.service.table_ingest import convert_csv, convert_parquet
from metaserve.service.upload_conversion import Limits
from metaserve.workers.tasks.table_format import read_canonical_table

LIMITS = Limits(dataset_max_images=1000, dataset_max_image_side=64,
                dataset_max_stored_bytes=2**20, dataset_max_rows=1000, dataset_max_columns=10,
                dataset_convert_memory_bytes=2**30)


def _csv(tmp_path: Path, text: bytes) -> tuple[dict, dict]:
    upload = tmp_path / "upload"
    upload.write_bytes(text)
    (tmp_path / "out").mkdir()
    converted = convert_csv(upload, tmp_path / "out", LIMITS)
    assert (converted.kind, converted.format) == ("table", "csv")
    return read_canonical_table(tmp_path / "out")


def test_text_in_a_number_column_is_counted_and_stored_missing(tmp_path) -> None:
    meta, values = _csv(tmp_path, "\ufeffid,dose,site\n1, 2.5 ,a\n1,N/A,b\n2,oops,\n2,1e3,a\n"
                                  "3,-inf,b\n".encode())
    columns = {c["name"]: c for c in meta["columns"]}
    assert list(columns) == ["id", "dose", "site"]  # the byte-order mark is not in the name
    assert {k: columns["dose"][k] for k in ("type", "missing", "non_numeric", "nonfinite")} == {
        "type": "number", "missing": 2, "non_numeric": 1, "nonfinite": 1}
    np.testing.assert_array_equal(values["dose"], [2.5, np.nan, np.nan, 1000.0, -np.inf])
    assert columns["site"]["categories"] == ["a", "b"]
    np.testing.assert_array_equal(values["site"].codes, [0, 1, -1, 0, 1])
    assert meta["groups"]["id"]["rows_per_task"] == [2, 2, 1]


def test_a_column_of_mostly_text_is_a_category_column(tmp_path) -> None:
    meta, values = _csv(tmp_path, b"zip,y\n02134,1\nSW1A,2\nEC2A,3\n")
    assert meta["columns"][0]["type"] == "category"
    assert meta["columns"][0]["categories"] == ["02134", "EC2A", "SW1A"]


@pytest.mark.parametrize(("text", "error", "message"), [
    (b"a,b,a\n1,2,3\n", InvalidDataset, 'line 1, column 3: the name "a" is used twice'),
    (b"a,,c\n1,2,3\n", InvalidDataset, "line 1, column 2: a column without a name"),
    (b"only\n1\n", InvalidDataset, "line 1: a header of 1 column"),
    (b"a,b\n", InvalidDataset, "the CSV has a header but no rows"),
    (b"", InvalidDataset, "line 1: the upload is empty"),
    (b"a,b\n" + b"1,2\n" * 1001, DatasetLimitExceeded, "rows: more than 1,000 rows"),
    (b"a,b\n1,2\n\xc3\n", InvalidDataset, "line 3: not UTF-8 text"),
])
def test_a_bad_csv_is_refused_naming_the_line_or_column(tmp_path, text, error, message) -> None:
    with pytest.raises(error) as raised:
        _csv(tmp_path, text)
    assert raised.value.message.startswith(message), raised.value.message


def _parquet(tmp_path: Path, table: pa.Table) -> tuple[dict, dict]:
    upload = tmp_path / "upload"
    pq.write_table(table, upload)
    (tmp_path / "out").mkdir()
    convert_parquet(upload, tmp_path / "out", LIMITS)
    return read_canonical_table(tmp_path / "out")


def test_parquet_types_become_numbers_or_categories(tmp_path) -> None:
    table = pa.table({
        "machine": pa.array(["m2", "m1", None, "m1"]).dictionary_encode(),
        "at": pa.array([dt.datetime(1970, 1, 1, 0, 0, s) for s in (1, 2, 3, 4)],
                       pa.timestamp("ms")),
        "day": pa.array([dt.date(1970, 1, d) for d in (1, 2, 3, 4)]),
        "ok": pa.array([True, False, None, True]),
        "load": pa.array([1, 2, None, 4], pa.int32())})
    meta, values = _parquet(tmp_path, table)
    assert [(c["name"], c["type"]) for c in meta["columns"]] == [
        ("machine", "category"), ("at", "number"), ("day", "number"), ("ok", "number"),
        ("load", "number")]
    assert values["machine"].categories == ["m1", "m2"]
    np.testing.assert_array_equal(values["machine"].codes, [1, 0, -1, 0])
    np.testing.assert_array_equal(values["at"], [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(values["day"], [0.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(values["ok"], [1.0, 0.0, np.nan, 1.0])
    np.testing.assert_array_equal(values["load"], [1.0, 2.0, np.nan, 4.0])


def test_a_parquet_column_of_lists_is_refused_naming_it(tmp_path) -> None:
    with pytest.raises(InvalidDataset) as raised:
        _parquet(tmp_path, pa.table({"id": [1, 2], "<b>": [[1.0], [2.0]]}))
    message = raised.value.message  # Arrow names a list's item "item" or "element" by version
    assert message.startswith('column "<b>": type list<') and message.endswith(
        ": double> is neither numbers nor text"), message


def test_parquet_rows_above_the_cap_are_refused_before_reading(tmp_path) -> None:
    with pytest.raises(DatasetLimitExceeded) as raised:
        _parquet(tmp_path, pa.table({"id": np.arange(1001), "y": np.zeros(1001)}))
    assert raised.value.message.startswith("rows: 1,001 rows, above the cap of 1,000")
