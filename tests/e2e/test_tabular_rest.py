"""Bring your own table, end to end through REST on a real ``metaserve serve`` (SQLite, its own
local Ray): upload a CSV made here (200 entities × 40 rows, each entity its own nonlinear
function of 3 features), train MAML on it by id, once on rows and once as a time series with
lagged targets, and adapt to held-out entities' *raw* rows: the adapted predictions, in the
target's own units, beat the unadapted meta-initialization's."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
import pytest

from metaserve.client import Client, adapt_rows
from metaserve.workers.tasks.table_format import split_task_ids
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.server]

ENTITIES, ROWS, SUPPORT, QUERY = 200, 40, 10, 20
COMMON = {"algorithm": {"name": "maml", "inner_lr": 0.1, "inner_steps": 3},
          "model": {"name": "mlp", "hidden": [40, 40]}, "meta_batch_size": 10,
          "iterations": 300, "log_every": 100, "checkpoint_every": 300,
          "outer_optimizer": {"lr": 0.003}, "evaluation": {"every": 0, "tasks": 50, "inner_steps": [3]}}
FAMILY = {"name": "tabular", "task_column": "entity", "target": "y", "features": ["x1", "x2", "x3"],
          "support_shots": SUPPORT, "query_shots": QUERY}
SERIES = {"time_column": "t", "lags": 2}


def panel(seed: int = 0) -> dict[str, np.ndarray]:
    """Entity e: ``y = A_e·sin(x1 + x2 + x3 + φ_e) + s_e·x2²`` at times 0..ROWS-1, with rows in
    shuffled order (the time column, not the file, orders a series)."""
    rng = np.random.default_rng(seed)
    entity = np.repeat(np.arange(ENTITIES), ROWS)
    x = rng.normal(size=(ENTITIES * ROWS, 3))
    amplitude, phase, slope = (rng.uniform(0.5, 2.0, ENTITIES), rng.uniform(0, np.pi, ENTITIES),
                               rng.uniform(-1, 1, ENTITIES))
    y = amplitude[entity] * np.sin(x.sum(axis=1) + phase[entity]) + slope[entity] * x[:, 1] ** 2
    order = rng.permutation(len(entity))
    return {"entity": np.array([f"e{i:03d}" for i in entity])[order],
            "t": np.tile(np.arange(ROWS), ENTITIES)[order], "x1": x[order, 0],
            "x2": x[order, 1], "x3": x[order, 2], "y": y[order]}


def csv_bytes(columns: dict[str, np.ndarray]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(list(columns))
    writer.writerows(zip(*[[repr(v) if isinstance(v, float) else str(v) for v in c.tolist()]
                           for c in columns.values()]))
    return text.getvalue().encode()


def held_out(columns: dict[str, np.ndarray], entity: str) -> tuple[dict, dict, np.ndarray]:
    """The entity's first SUPPORT rows in time as raw support rows (with the target), the next
    QUERY rows as query rows (without it), and the query's true targets."""
    rows = np.flatnonzero(columns["entity"] == entity)
    rows = rows[np.argsort(columns["t"][rows])]
    support, query = rows[:SUPPORT], rows[SUPPORT:SUPPORT + QUERY]
    names = ["x1", "x2", "x3", "t"]
    return ({name: columns[name][support].tolist() for name in names + ["y"]},
            {name: columns[name][query].tolist() for name in names}, columns["y"][query])


def wait(client, job_id: str, timeout: float = 300) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "cancelled"} or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def squared_error(client, job_id: str, support: dict, query: dict, truth: np.ndarray,  # noqa: ANN001
                  steps: int | None = None) -> float:
    body = {"support": support, "query": query, **({} if steps is None else {"steps": steps})}
    response = client.post(f"/v1/jobs/{job_id}/adapt", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["targets"] == ["y"] and len(result["predictions"]) == QUERY
    return float(np.mean((np.array(result["predictions"])[:, 0] - truth) ** 2))


def test_upload_a_table_train_maml_by_id_and_adapt_to_held_out_entities_raw_rows(tmp_path: Path) -> None:
    columns = panel()
    server = ServerProcess(tmp_path).start()
    try:
        with server.client() as client:
            uploaded = client.post("/v1/datasets", params={"name": "panel"}, content=csv_bytes(columns))
            assert uploaded.status_code == 201, uploaded.text
            dataset = uploaded.json()["id"]
            jobs = {kind: client.post("/v1/jobs", json={**COMMON, "task_family": {
                        **FAMILY, **extra, "dataset": dataset}}).json()
                    for kind, extra in (("rows", {}), ("series", SERIES))}
            for kind, job in jobs.items():
                assert "id" in job, job
                finished = wait(client, job["id"])
                assert finished["status"] == "succeeded", (kind, finished)

            test_entities = split_task_ids(columns["entity"], (0.7, 0.15, 0.15), 0)["test"]
            for kind, job in jobs.items():
                adapted, unadapted = [], []
                for entity in test_entities[:15].tolist():
                    support, query, truth = held_out(columns, entity)
                    if kind == "rows":  # rows without a time column: the time is not a column
                        support.pop("t"), query.pop("t")
                    adapted.append(squared_error(client, job["id"], support, query, truth))
                    unadapted.append(squared_error(client, job["id"], support, query, truth, steps=0))
                assert np.mean(adapted) < 0.8 * np.mean(unadapted), (kind, np.mean(adapted),
                                                                     np.mean(unadapted))

            # the same rows as row objects give the same predictions; a misnamed column is a 422
            support, query, _ = held_out(columns, test_entities[0])
            as_columns = client.post(f"/v1/jobs/{jobs['series']['id']}/adapt",
                                     json={"support": support, "query": query}).json()
            as_objects = client.post(f"/v1/jobs/{jobs['series']['id']}/adapt", json={
                "support": [dict(zip(support, row)) for row in zip(*support.values())],
                "query": [dict(zip(query, row)) for row in zip(*query.values())]}).json()
            assert as_objects["predictions"] == as_columns["predictions"]
            renamed = {("X1" if name == "x1" else name): values for name, values in support.items()}
            misnamed = client.post(f"/v1/jobs/{jobs['series']['id']}/adapt",
                                   json={"support": renamed, "query": query})
            assert misnamed.status_code == 422
            assert misnamed.json()["error"]["details"][0]["field"] == "support.x1"

            # the SDK: the same rows, server-side and offline on the downloaded artifact
            with Client(url=server.url, api_key=server.admin_key) as sdk:
                remote = sdk.adapt_remote(jobs["series"]["id"], support=support, query=query)
                model, recipe = sdk.load_meta_init(jobs["series"]["id"], cache_dir=tmp_path / "cache")
            assert remote["predictions"] == as_columns["predictions"]
            assert recipe["data"]["lags"] == 2 and recipe["data"]["features"] == ["x1", "x2", "x3"]
            offline = adapt_rows(model, support=support, query=query)["predictions"]
            assert np.allclose(offline, remote["predictions"], rtol=1e-5, atol=1e-6)
    finally:
        server.terminate()
