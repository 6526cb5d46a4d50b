"""``/v1/datasets`` with tables: CSV and Parquet uploads of a task-grouped table described,
bad tables refused naming the problem with nothing stored, and tabular specs checked at submit
against the table (422 naming the field, no job row)."""

from __future__ import annotations

import csv
import io
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from metaserve.api.app import create_app
from metaserve.service.settings import Settings
from metaserve.workers.tasks.table_format import read_canonical_table
from tests import synthetic_datasets as synth

ENTITIES, ROWS = 200, 40
SQL_NAME, HTML_NAME = "'; DROP TABLE jobs;--", "<script>alert(1)</script>"


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=db_url, dispatcher=False, data_dir=tmp_path / "state",
                    artifact_root=tmp_path / "artifacts", dataset_max_upload_bytes=32 * 2**20,
                    dataset_max_columns=50, dataset_max_stored_bytes=64 * 2**20)


@pytest.fixture
def api(engine, settings: Settings) -> Iterator[TestClient]:  # noqa: ANN001
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def panel(entities: int = ENTITIES, rows: int = ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    """``entities`` tasks of ``rows`` rows: each entity its own nonlinear function of 3
    features, ``y = a·sin(x1 + b) + x2·x3``."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, entities, 1))
    x = rng.normal(size=(3, entities, rows))
    y = a * np.sin(x[0] + b) + x[1] * x[2]
    return {"entity": np.repeat([f"e{i:03d}" for i in range(entities)], rows),
            "t": np.tile(np.arange(rows), entities).astype(np.int64),
            "x1": x[0].ravel(), "x2": x[1].ravel(), "x3": x[2].ravel(), "y": y.ravel()}


def csv_bytes(columns: dict[str, np.ndarray]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(list(columns))
    writer.writerows(zip(*[[repr(float(v)) if isinstance(v, float) else str(v) for v in c.tolist()]
                           for c in columns.values()]))
    return text.getvalue().encode()


def parquet_bytes(columns: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def upload(api: TestClient, auth: dict, body: bytes, name: str = "panel"):  # noqa: ANN201
    return api.post("/v1/datasets", params={"name": name}, content=body, headers=auth)


def nothing_stored(api: TestClient, settings: Settings, auth: dict) -> bool:
    return (synth.files_under(settings.upload_dir) == []
            and synth.files_under(Path(settings.artifact_root)) == []
            and api.get("/v1/datasets", headers=auth).json()["data"] == [])


def submit(api: TestClient, auth: dict, dataset_id: str, **family):  # noqa: ANN201
    spec = {"algorithm": {"name": "maml"}, "model": {"name": "mlp", "hidden": [8]},
            "task_family": {"name": "tabular", "dataset": dataset_id, "task_column": "entity",
                            "target": "y", "support_shots": 5, "query_shots": 5, **family}}
    return api.post("/v1/jobs", json=spec, headers=auth)


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_a_task_grouped_table_is_stored_and_described(api, settings, alice_auth,
                                                      file_format) -> None:  # noqa: ANN001
    columns = panel()
    body = csv_bytes(columns) if file_format == "csv" else parquet_bytes(columns)
    response = upload(api, alice_auth, body)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert (dataset["kind"], dataset["format"], dataset["classes"], dataset["shape"]) == (
        "table", file_format, None, None)
    meta = dataset["meta"]
    assert meta["rows"] == ENTITIES * ROWS
    assert [(c["name"], c["type"], c["missing"], c["constant"]) for c in meta["columns"]] == [
        ("entity", "category", 0, False), ("t", "number", 0, False), ("x1", "number", 0, False),
        ("x2", "number", 0, False), ("x3", "number", 0, False), ("y", "number", 0, False)]
    assert {k: v for k, v in meta["groups"]["entity"].items() if k != "rows_per_task"} == {
        "tasks": ENTITIES, "min_rows": ROWS, "max_rows": ROWS, "rows_histogram": [[ROWS, ENTITIES]],
        "histogram_binned": False, "missing": 0}
    assert set(meta["groups"]) == {"entity", "t"}  # x1..y hold non-integer numbers
    assert dataset["split_sizes"]["entity"] == {"tasks": {"train": 140, "val": 30, "test": 30},
                                                "max_rows_per_split": ROWS}
    assert ('tabular regression with task_column "entity" (support_shots + query_shots up to '
            f'{ROWS} in every split)') in dataset["usable_for"]
    assert api.get(f"/v1/datasets/{dataset['id']}", headers=alice_auth).json() == dataset
    stored_meta, values = read_canonical_table(Path(settings.artifact_root) / dataset["id"])
    assert stored_meta["rows"] == ENTITIES * ROWS
    for name in ("x1", "x2", "x3", "y"):
        np.testing.assert_array_equal(values[name], columns[name])  # exact: repr round-trips
    entity = values["entity"]
    np.testing.assert_array_equal(np.asarray(entity.categories)[entity.codes], columns["entity"])
    assert synth.files_under(settings.upload_dir) == []


def test_a_submitted_tabular_job_stores_the_resolved_features(api, alice_auth) -> None:  # noqa: ANN001
    dataset = upload(api, alice_auth, csv_bytes(panel())).json()
    response = submit(api, alice_auth, dataset["id"], time_column="t")
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["task_family"]["features"] == ["x1", "x2", "x3"]


def test_a_tabular_sweep_resolves_the_features_before_its_cost_check(api, alice_auth,
                                                                    sessions) -> None:  # noqa: ANN001
    """``features: null`` is resolved from the table before the cost model reads the input
    width (it was a 500); a column the table lacks is a 422 naming the field, nothing stored."""
    from sqlalchemy import func, select

    from metaserve.service.orm import Job, Sweep

    dataset = upload(api, alice_auth, csv_bytes(panel())).json()

    def sweep(**family):  # noqa: ANN003, ANN202
        spec = {"algorithm": {"name": "maml"}, "model": {"name": "mlp", "hidden": [8]},
                "iterations": 4, "task_family": {
                    "name": "tabular", "dataset": dataset["id"], "task_column": "entity",
                    "target": "y", "support_shots": 5, "query_shots": 5, "features": None,
                    **family}}
        return api.post("/v1/sweeps", headers=alice_auth, json={
            "spec": spec, "space": {"algorithm.inner_lr": {"grid": [0.01, 0.1]}},
            "search": {"name": "grid"}, "scheduler": {"name": "fifo"}})

    response = sweep(time_column="t")
    assert response.status_code == 201, response.text
    assert response.json()["config"]["spec"]["task_family"]["features"] == ["x1", "x2", "x3"]
    missing = sweep(target="no_such_column")
    assert missing.status_code == 422, missing.text
    assert [d["field"] for d in missing.json()["error"]["details"]] == [
        "spec.task_family.target"], missing.text
    with sessions() as session:
        assert (session.scalar(select(func.count()).select_from(Sweep)),
                session.scalar(select(func.count()).select_from(Job))) == (1, 1)


def _declared_10_gb_parquet() -> bytes:
    """A small Parquet file whose footer declares a 10 GiB row group (re-encoded by
    fastparquet's thrift writer): what a hostile upload would send."""
    from fastparquet import ParquetFile

    data = parquet_bytes(panel(entities=4, rows=5))
    parsed = ParquetFile(io.BytesIO(data))
    group = parsed.fmd.row_groups[0]
    group.total_byte_size = 10 * 2**30
    for chunk in group.columns:
        chunk.meta_data.total_uncompressed_size = 10 * 2**30 // len(group.columns)
    footer = parsed.fmd.to_bytes()
    (length,) = struct.unpack("<I", data[-8:-4])
    return data[:-8 - length] + footer + struct.pack("<I", len(footer)) + b"PAR1"


def _one_row_tasks() -> bytes:
    count = 1_000_000
    lines = "".join(f"e{i:07d},{i % 97}.5\n" for i in range(count))
    return ("entity,y\n" + lines).encode()


BAD_TABLES = {
    "ragged row": (b"entity,x,y\na,1,2\nb,3\nc,4,5\n", "invalid_dataset",
                   "line 3: 2 fields where the header has 3 columns"),
    "unclosed quote": (b'entity,x,y\na,1,2\nb,"3,4\nc,5,6\n', "invalid_dataset",
                       "line 3: 2 fields where the header has 3 columns (a stray comma or quote?)"),
    "quoted value over two lines": (b'entity,x,y\na,1,2\nb,"3\n4",5\n', "invalid_dataset",
                                    'data row 2, column "x": a value spans lines'),
    "not UTF-8": (b"entity,x,y\na,1,2\nb,\xff\xfe,3\n", "invalid_dataset",
                  "line 3: not UTF-8 text"),
    "no header": (b"1,2,3\n4,5,6\n", "invalid_dataset",
                  "line 1: every name in the first line is a number"),
    "too many columns": (",".join(f"c{i}" for i in range(51)).encode() + b"\n", "limit_exceeded",
                         "columns: 51 columns, more than the cap of 50"),
    "header over its cap": (b"a," * 600_000 + b"b\n1,2\n", "invalid_dataset",
                            "line 1: the header row is longer than 1,048,576 bytes"),
    "declared 10 GB row group": (None, "limit_exceeded",
                                 "row_group 0: it declares 10,737,418,240 bytes uncompressed"),
    "1e6 tasks of 1 row": (None, "limit_exceeded",
                           'column "entity": 1,000,000 distinct text values, more than 100,000'),
}


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=pytest.mark.slow) if case == "1e6 tasks of 1 row" else case
    for case in BAD_TABLES])
def test_a_bad_table_is_refused_naming_the_problem_and_nothing_is_stored(
        api, settings, alice_auth, case) -> None:  # noqa: ANN001
    body, code, message = BAD_TABLES[case]
    if case == "declared 10 GB row group":
        body = _declared_10_gb_parquet()
    elif case == "1e6 tasks of 1 row":
        body = _one_row_tasks()
    response = upload(api, alice_auth, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert message in error["message"], error["message"]
    assert nothing_stored(api, settings, alice_auth)


@pytest.mark.dialects  # the names travel in a JSON column: PostgreSQL's too
def test_sql_and_html_column_names_are_data(api, settings, alice_auth) -> None:  # noqa: ANN001
    columns = panel(entities=30, rows=12)
    columns = {"entity": columns["entity"], SQL_NAME: columns["x1"], HTML_NAME: columns["y"]}
    response = upload(api, alice_auth, csv_bytes(columns))
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    dataset = response.json()
    assert [c["name"] for c in dataset["meta"]["columns"]] == ["entity", SQL_NAME, HTML_NAME]
    job = submit(api, alice_auth, dataset["id"], target=HTML_NAME, support_shots=3,
                 query_shots=3)
    assert job.status_code == 201, job.text
    assert job.json()["spec"]["task_family"]["features"] == [SQL_NAME]
    assert [j["id"] for j in api.get("/v1/jobs", headers=alice_auth).json()["data"]] == [
        job.json()["id"]]  # the jobs table is there, with its one job


def test_nan_and_inf_targets_are_recorded_and_refused_at_submit(api, alice_auth) -> None:  # noqa: ANN001
    columns = panel(entities=30, rows=12)
    columns["y"][[4, 40]] = [np.nan, np.inf]
    dataset = upload(api, alice_auth, parquet_bytes(columns)).json()
    y = next(c for c in dataset["meta"]["columns"] if c["name"] == "y")
    assert (y["missing"], y["nonfinite"]) == (1, 1)
    response = submit(api, alice_auth, dataset["id"])
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == [{
        "field": "task_family.target",
        "message": 'column "y" has 1 missing/NaN and 1 infinite value(s); clean them, or set '
                   "on_invalid: skip to drop those rows"}]
    assert api.get("/v1/jobs", headers=alice_auth).json()["data"] == []
    assert submit(api, alice_auth, dataset["id"], on_invalid="skip").status_code == 201


@pytest.mark.parametrize(("family", "field", "message"), [
    ({"target": "nope"}, "task_family.target", 'no column "nope" in the table (its columns: '
                                               '"entity", "t", "x1", "x2", "x3", "y")'),
    ({"support_shots": 30, "query_shots": 20}, "task_family.support_shots",
     'the train split has 140 task(s) of "entity" and 0 of them have at least 50 rows '
     "(support_shots 30 + query_shots 20); the largest task has 40 rows: lower the shots or "
     "change split"),
    ({"features": ["x1", "entity_typo"]}, "task_family.features", 'no column "entity_typo"'),
])
def test_a_spec_the_table_cannot_serve_is_422_at_submit_naming_the_field(
        api, alice_auth, family, field, message) -> None:  # noqa: ANN001
    dataset = upload(api, alice_auth, csv_bytes(panel())).json()
    response = submit(api, alice_auth, dataset["id"], **family)
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    assert [d["field"] for d in details] == [field]
    assert details[0]["message"].startswith(message), details[0]["message"]
    assert api.get("/v1/jobs", headers=alice_auth).json()["data"] == []


def test_an_image_dataset_is_not_a_table_and_back(api, alice_auth) -> None:  # noqa: ANN001
    images = upload(api, alice_auth, synth.npz_bytes(*synth.shapes(classes=6, per_class=4)))
    table = upload(api, alice_auth, csv_bytes(panel(entities=30, rows=12)))
    response = submit(api, alice_auth, images.json()["id"])
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "task_family.dataset"
    assert "is an image dataset" in response.json()["error"]["message"]
    response = api.post("/v1/jobs", headers=alice_auth, json={
        "algorithm": {"name": "maml"},
        "task_family": {"name": "images", "dataset": table.json()["id"], "ways": 2}})
    assert response.status_code == 422
    assert "is a table" in response.json()["error"]["message"]


@pytest.mark.parametrize(("limit", "message"), [
    ({"dataset_convert_memory_bytes": 256 * 2**20},
     "body: converting the upload needs more than 268,435,456 bytes of memory "
     "(METASERVE_DATASET_CONVERT_MEMORY_BYTES)"),
    ({"dataset_convert_timeout_s": 0.2},
     "body: converting the upload took longer than 0.2 s (METASERVE_DATASET_CONVERT_TIMEOUT_S)"),
])
def test_a_conversion_out_of_memory_or_time_is_422_and_nothing_is_stored(
        engine, settings, alice_auth, limit, message) -> None:  # noqa: ANN001
    """The child process fails, not the server: it answers, and keeps nothing. (At 256 MiB the
    child cannot even map its libraries: an import failing for memory is read as memory too;
    benchmarks/upload_memory.py --tables runs a table too large for the child's memory.)"""
    limited = settings.model_copy(update=limit)
    with TestClient(create_app(limited)) as api:
        response = upload(api, alice_auth, csv_bytes(panel(entities=30, rows=12)))
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert (error["code"], [d["field"] for d in error["details"]]) == ("limit_exceeded",
                                                                            ["body"])
        assert error["message"].startswith(message), error["message"]
        assert nothing_stored(api, limited, alice_auth)
        assert api.get("/healthz").status_code == 200


def test_an_upload_finding_every_conversion_slot_taken_is_503_and_nothing_is_stored(
        engine, settings, alice_auth, monkeypatch) -> None:  # noqa: ANN001
    from metaserve.service import dataset_ingest

    monkeypatch.setattr(dataset_ingest, "SLOT_WAIT_S", 0.2)
    limited = settings.model_copy(update={"dataset_convert_concurrency": 1})
    slots = dataset_ingest._conversion_slots(1)
    with TestClient(create_app(limited)) as api:
        assert slots.acquire(timeout=5)  # another upload converting
        try:
            response = upload(api, alice_auth, csv_bytes(panel(entities=30, rows=12)))
        finally:
            slots.release()
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["message"] == (
            "1 uploads are being converted (METASERVE_DATASET_CONVERT_CONCURRENCY); retry later")
        assert nothing_stored(api, limited, alice_auth)
