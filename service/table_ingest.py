"""Conversion of an uploaded table (CSV or Parquet) into the canonical layout of
:mod:`metaserve.workers.tasks.table_format`; run in the conversion child of
:mod:`metaserve.service.dataset_ingest` (so a table too large for memory ends that process,
not the server's).

CSV: UTF-8, comma-separated, a header row naming every column (at most
``MAX_HEADER_BYTES``, names of 1 to ``MAX_COLUMN_NAME`` characters, no duplicates), at most
``dataset_max_columns`` columns and ``dataset_max_rows`` rows, every row as many fields as the
header. Every cell is read as text (Arrow's CSV reader, ``Arrow's`` own null markers: empty,
``NA``, ``null``, ``NaN``, ...), then a column whose present values are at least half numbers
is a number column (the other cells recorded as ``non_numeric`` and stored missing), any other
column a category column. A quoted value spanning lines is refused (an unclosed quote).

Parquet: the footer is checked before anything is read: at most ``MAX_FOOTER_BYTES``, the
declared rows and columns within the caps, no row group or column chunk declaring more
uncompressed bytes than ``dataset_max_stored_bytes`` or than half the conversion's memory (a
lying footer that declares 10 GB is refused naming the row group, nothing read). Number,
boolean, decimal, date (days) and timestamp (seconds since 1970) columns are numbers;
string and dictionary columns categories; other types are refused naming the column.

Errors name the line (CSV physical line, the header being line 1), the row or the column.
"""

from __future__ import annotations

import codecs
import csv
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from metaserve.service.exceptions import DatasetLimitExceeded, InvalidDataset
from metaserve.service.upload_conversion import Converted, Limits
from metaserve.workers.tasks.table_format import (MAX_GROUP_TASKS, TABLE_FILES, CategoryColumn,
                                                  write_canonical_table)

MAX_HEADER_BYTES = 1 << 20
MAX_COLUMN_NAME = 200
MAX_FOOTER_BYTES = 16 << 20
CSV_BLOCK_BYTES = 1 << 20
NUMBER_PATTERN = r"^[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|inf|infinity|nan)$"
BYTES_PER_CELL = 8


def _quote(name: str) -> str:
    """A column name as messages show it: JSON-quoted, so no name reads as anything else."""
    return json.dumps(name)


# --------------------------------------------------------------------------- CSV


def _header(upload: Path, limits: Limits) -> list[str]:
    with open(upload, "rb") as handle:
        first = handle.readline(MAX_HEADER_BYTES + 1)
    if not first.strip():
        raise InvalidDataset("line 1: the upload is empty or starts with an empty line; a CSV "
                             "needs a header row naming its columns", line=1)
    if len(first) > MAX_HEADER_BYTES:
        raise InvalidDataset(f"line 1: the header row is longer than {MAX_HEADER_BYTES:,} bytes "
                             "(or the upload is not a CSV table, .npz, zip, tar or Parquet file)",
                             line=1)
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidDataset(f"line 1: not UTF-8 (byte {error.start + 1}); the upload is not "
                             "a CSV table, .npz, zip, tar or Parquet file", line=1) from None
    try:
        names = next(csv.reader([text.rstrip("\r\n")]))
    except (csv.Error, StopIteration) as error:
        raise InvalidDataset(f"line 1: the header row cannot be read ({error})", line=1) from None
    if len(names) > limits.dataset_max_columns:
        raise DatasetLimitExceeded(
            f"columns: {len(names):,} columns, more than the cap of "
            f"{limits.dataset_max_columns:,} (METASERVE_DATASET_MAX_COLUMNS)",
            columns=f"{len(names):,} columns")
    if len(names) < 2:
        raise InvalidDataset(f"line 1: a header of {len(names)} column; a task-grouped table "
                             "needs at least a task column and a target column", line=1)
    seen: set[str] = set()
    for index, name in enumerate(names, start=1):
        if not name.strip():
            raise InvalidDataset(f"line 1, column {index}: a column without a name; the first "
                                 "line must be a header naming every column", line=1,
                                 column=index)
        if len(name) > MAX_COLUMN_NAME:
            raise InvalidDataset(f"line 1, column {index}: a name of {len(name):,} characters, "
                                 f"more than {MAX_COLUMN_NAME}", line=1, column=index)
        if name in seen:
            raise InvalidDataset(f"line 1, column {index}: the name {_quote(name)} is used "
                                 "twice", line=1, column=index)
        seen.add(name)
    if all(_is_number(name) for name in names):
        raise InvalidDataset("line 1: every name in the first line is a number; the first line "
                             "must be a header naming the columns", line=1)
    return names


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_utf8(upload: Path) -> None:
    """Refuse a file that is not UTF-8, naming the line of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(upload, "rb") as handle:
        while chunk := handle.read(CSV_BLOCK_BYTES):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line += chunk[:error.start].count(b"\n")
                raise InvalidDataset(f"line {line}: not UTF-8 text (a byte 0x{chunk[error.start]:02x}"
                                     "); save the CSV as UTF-8", line=line) from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InvalidDataset(f"line {line}: the file ends inside a UTF-8 character",
                                 line=line) from None


def convert_csv(upload: Path, workdir: Path, limits: Limits) -> Converted:
    """A CSV upload into the canonical table in ``workdir``."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    names = _header(upload, limits)
    _check_utf8(upload)
    ragged: list[Any] = []

    def refuse_row(row: Any) -> str:
        ragged.append(row)
        return "error"

    try:
        reader = pa_csv.open_csv(
            upload,
            read_options=pa_csv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=refuse_row),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in names}, strings_can_be_null=True))
        batches, rows = [], 0
        max_rows = min(limits.dataset_max_rows,
                       limits.dataset_max_stored_bytes // (BYTES_PER_CELL * len(names)))
        for batch in reader:
            rows += batch.num_rows
            if rows > max_rows:
                raise _too_many_rows(rows, len(names), limits, more=True)
            batches.append(batch)
    except pa.ArrowInvalid as error:
        if ragged:
            row = ragged[0]
            where = f"line {row.number}" if row.number is not None else "a line"
            raise InvalidDataset(
                f"{where}: {row.actual_columns} fields where the header has "
                f"{row.expected_columns} columns (a stray comma or quote?)",
                line=row.number, fields=row.actual_columns) from None
        raise InvalidDataset(f"body: the CSV cannot be parsed ({error})", body=str(error)) from None
    if not rows:
        raise InvalidDataset("the CSV has a header but no rows", body="no rows")
    table = pa.Table.from_batches(batches, schema=reader.schema)
    del batches
    columns, non_numeric = {}, {}
    for index, name in enumerate(names):
        columns[name], non_numeric[name] = _text_column(name, table.column(index))
    del table
    meta = write_canonical_table(workdir, columns, source_format="csv", non_numeric=non_numeric)
    return Converted("table", "csv", list(TABLE_FILES), meta)


def _too_many_rows(rows: int, columns: int, limits: Limits, more: bool = False) -> Exception:
    at_least = "more than " if more else ""
    if rows > limits.dataset_max_rows:
        counted = f"more than {limits.dataset_max_rows:,}" if more else f"{rows:,}"
        return DatasetLimitExceeded(
            f"rows: {counted} rows, above the cap of {limits.dataset_max_rows:,} "
            "(METASERVE_DATASET_MAX_ROWS)", rows=f"{counted} rows")
    stored = rows * columns * BYTES_PER_CELL
    return DatasetLimitExceeded(
        f"rows: {at_least}{rows:,} rows × {columns:,} columns are {stored:,} bytes stored, "
        f"above the cap of {limits.dataset_max_stored_bytes:,} "
        "(METASERVE_DATASET_MAX_STORED_BYTES)", rows=f"{stored:,} bytes stored")


def _text_column(name: str, values: Any) -> tuple[np.ndarray | CategoryColumn, int]:
    """A column read as text into numbers (at least half its present values numbers) or
    categories, and how many present values were not numbers (stored as missing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = values.combine_chunks() if hasattr(values, "combine_chunks") else values
    spans = pc.match_substring_regex(values, r"[\r\n]")
    if pc.any(spans).as_py():
        row = int(pc.index(spans, True).as_py()) + 1
        raise InvalidDataset(f"data row {row}, column {_quote(name)}: a value spans lines (an "
                             "unclosed quote?)", row=row, column=name)
    trimmed = pc.utf8_trim_whitespace(values)
    numeric = pc.match_substring_regex(trimmed, NUMBER_PATTERN, ignore_case=True)
    present = len(values) - values.null_count
    numbers = int(pc.sum(numeric).as_py() or 0)
    if numbers and 2 * numbers >= present:
        kept = pc.if_else(numeric, trimmed, pa.scalar(None, pa.string()))
        array = pc.cast(kept, pa.float64()).to_numpy(zero_copy_only=False)
        return np.asarray(array, dtype=np.float64), present - numbers
    return _categories(name, values), 0


def _categories(name: str, values: Any) -> CategoryColumn:
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(values)
    categories = encoded.dictionary.to_pylist()
    if len(categories) > MAX_GROUP_TASKS:
        raise DatasetLimitExceeded(
            f"column {_quote(name)}: {len(categories):,} distinct text values, more than "
            f"{MAX_GROUP_TASKS:,} (a task column's ids, or categories, are stored in the "
            "dataset's metadata); a table of that many tasks with so few rows each is not a "
            "few-shot dataset", column=name)
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False)
    return CategoryColumn(np.asarray(codes, dtype=np.int64), [str(c) for c in categories])


# --------------------------------------------------------------------------- Parquet


def _check_footer(upload: Path) -> None:
    size = upload.stat().st_size
    with open(upload, "rb") as handle:
        handle.seek(size - 8)
        (length,) = struct.unpack("<I", handle.read(4))
    if length > MAX_FOOTER_BYTES or length > size - 12:
        raise InvalidDataset(f"parquet: a footer of {length:,} bytes in a file of {size:,} "
                             f"(at most {MAX_FOOTER_BYTES:,})", body="parquet footer")


def _check_declared(metadata: Any, limits: Limits) -> None:
    """Refuse what the footer declares before a byte of data is read."""
    if metadata.num_columns > limits.dataset_max_columns:
        raise DatasetLimitExceeded(
            f"columns: {metadata.num_columns:,} columns, more than the cap of "
            f"{limits.dataset_max_columns:,} (METASERVE_DATASET_MAX_COLUMNS)",
            columns=f"{metadata.num_columns:,} columns")
    if (metadata.num_rows > limits.dataset_max_rows or metadata.num_rows * metadata.num_columns
            * BYTES_PER_CELL > limits.dataset_max_stored_bytes):
        raise _too_many_rows(metadata.num_rows, metadata.num_columns, limits)
    cap = min(limits.dataset_max_stored_bytes, limits.dataset_convert_memory_bytes // 2)
    total = 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        declared = max(group.total_byte_size,
                       sum(max(group.column(c).total_uncompressed_size, 0)
                           for c in range(group.num_columns)))
        total += declared
        if declared > cap or total > limits.dataset_max_stored_bytes:
            which = "it" if declared > cap else "the row groups up to it"
            raise DatasetLimitExceeded(
                f"row_group {index}: {which} declare{'s' if declared > cap else ''} "
                f"{(declared if declared > cap else total):,} bytes uncompressed, above "
                f"{cap:,} (METASERVE_DATASET_MAX_STORED_BYTES, or half of "
                "METASERVE_DATASET_CONVERT_MEMORY_BYTES); nothing was read",
                row_group=index)


def convert_parquet(upload: Path, workdir: Path, limits: Limits) -> Converted:
    """A Parquet upload into the canonical table in ``workdir``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_footer(upload)
    try:
        parquet = pq.ParquetFile(upload)
    except (pa.ArrowException, OSError) as error:
        raise InvalidDataset(f"parquet: the footer cannot be read ({error})",
                             body="parquet footer") from None
    _check_declared(parquet.metadata, limits)
    schema = parquet.schema_arrow
    if len(schema) < 2:
        raise InvalidDataset(f"parquet: {len(schema)} column; a task-grouped table needs at "
                             "least a task column and a target column", body="columns")
    for index, field in enumerate(schema):
        if not field.name.strip() or len(field.name) > MAX_COLUMN_NAME:
            raise InvalidDataset(f"column {index + 1}: a name must have 1 to "
                                 f"{MAX_COLUMN_NAME} characters", column=index + 1)
        _number_kind(field)  # refuses a type that is neither numbers nor text
    if len(set(schema.names)) != len(schema.names):
        twice = next(n for n in schema.names if schema.names.count(n) > 1)
        raise InvalidDataset(f"column {_quote(twice)} appears twice", column=twice)
    try:
        table = parquet.read(use_threads=False)
    except (pa.ArrowException, OSError) as error:
        if isinstance(error, pa.ArrowMemoryError):
            raise MemoryError(str(error)) from None
        raise InvalidDataset(f"parquet: the data cannot be read ({error})",
                             body="parquet data") from None
    if table.num_rows == 0:
        raise InvalidDataset("parquet: the table has no rows", body="no rows")
    columns = {field.name: _typed_column(field, table.column(index))
               for index, field in enumerate(schema)}
    meta = write_canonical_table(workdir, columns, source_format="parquet")
    return Converted("table", "parquet", list(TABLE_FILES), meta)


def _number_kind(field: Any) -> str:
    import pyarrow as pa

    kind = field.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "category"
    if pa.types.is_timestamp(kind):
        return "timestamp"
    if pa.types.is_date(kind):
        return "date"
    if (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            or pa.types.is_decimal(kind)):
        return "number"
    raise InvalidDataset(f"column {_quote(field.name)}: type {field.type} is neither numbers "
                         "nor text", column=field.name)


def _typed_column(field: Any, values: Any) -> np.ndarray | CategoryColumn:
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = _number_kind(field)
    values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if kind == "category":
        return _categories(field.name, values)
    if kind == "timestamp":
        unit = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[values.type.unit]
        seconds = pc.cast(pc.cast(values, pa.int64()), pa.float64())
        return seconds.to_numpy(zero_copy_only=False) / unit
    if kind == "date":
        return pc.cast(pc.cast(values, pa.int32()), pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False),
                      dtype=np.float64)
