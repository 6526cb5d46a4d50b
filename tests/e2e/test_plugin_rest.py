"""The example plugin through REST on the embedded default (the real ``metaserve serve``, SQLite,
the local Ray it starts): listed in the catalogs with its JSON schema, a MAML job on the
plugin's task family and network runs to success, its artifact loads through the SDK and adapts,
locally and server-side. The server has broken plugins installed too (real distributions on its
``PYTHONPATH``): it starts, serves, logs one line for each and lists none of them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import torch

from metaserve.client import Client
from metaserve.workers.spec import JobSpec
from metaserve.workers.tasks import build_task_family
from tests.plugin_dists import (BROKEN_ENTRIES, BROKEN_PACKAGE, reason_matches,
                                write_broken_plugins)
from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow

EXAMPLE_PACKAGE = "metaserve-example-plugin"
BROKEN = ["import_error", "bad_schema", "sine"]  # an import error, a bad schema, a taken name
JOB = {"name": "plugin-rest", "algorithm": {"name": "maml", "inner_lr": 0.1},
       "task_family": {"name": "oscillator", "support_shots": 10, "query_shots": 10},
       "model": {"name": "resmlp", "width": 32, "blocks": 2},
       "iterations": 150, "meta_batch_size": 8, "checkpoint_every": 50, "log_every": 50,
       "evaluation": {"every": 0, "tasks": 20, "inner_steps": [1, 5]},
       "resources": {"workers": 1, "cpus_per_worker": 1}, "seed": 5}
FRESH_TASKS = 20
ADAPT_STEPS = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("plugin-server")
    plugins_dir = write_broken_plugins(root / "site", BROKEN)
    process = ServerProcess(root, PYTHONPATH=str(plugins_dir)).start()
    process.startup_log = process.log_path.read_text()  # before any adapt process starts
    try:
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def finished_job(server: ServerProcess) -> dict:
    with server.client() as client:
        response = client.post("/v1/jobs", json=JOB)
        assert response.status_code == 201, response.text
        job = response.json()
        deadline = time.monotonic() + 600
        while job["status"] not in {"succeeded", "failed", "cancelled"}:
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
            job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    return job


def fresh_tasks():  # noqa: ANN201
    """Oscillators the job never saw: the family's test split under another seed."""
    family = build_task_family(JobSpec.model_validate(JOB).task_family)
    return family.sample(seed=424242, split="test", iteration=0, task_indices=range(FRESH_TASKS))


def test_the_server_with_broken_plugins_serves_and_logs_one_line_for_each(server: ServerProcess):
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
    for name in BROKEN:
        group, value, _reason = BROKEN_ENTRIES[name]
        lines = [line for line in server.startup_log.splitlines() if f"plugin {name!r} " in line]
        assert len(lines) == 1, server.startup_log
        head = (f"plugin {name!r} ({group} entry point {value!r}, package {BROKEN_PACKAGE}) "
                f"is not loaded: ")
        assert head in lines[0], lines[0]
        assert reason_matches(name, lines[0].split(head, 1)[1]), lines[0]


def test_the_catalogs_list_the_example_plugin_with_its_schema_and_omit_the_broken(
        server: ServerProcess):
    version = metadata.version(EXAMPLE_PACKAGE)
    with server.client() as client:
        families = {entry["name"]: entry for entry in client.get("/v1/task-families").json()}
        networks = {entry["name"]: entry for entry in client.get("/v1/networks").json()}
    oscillator, resmlp = families["oscillator"], networks["resmlp"]
    assert (oscillator["source"], oscillator["package"], oscillator["version"]) == (
        "plugin", EXAMPLE_PACKAGE, version)
    assert (resmlp["source"], resmlp["package"], resmlp["version"]) == (
        "plugin", EXAMPLE_PACKAGE, version)
    assert oscillator["json_schema"]["properties"]["damping"]["default"] == [0.1, 0.6]
    assert oscillator["json_schema"]["additionalProperties"] is False
    assert resmlp["json_schema"]["properties"]["width"] == {
        "default": 40, "description": "Units of every hidden layer.", "maximum": 4096,
        "minimum": 1, "title": "Width", "type": "integer"}
    assert {p["name"] for p in resmlp["parameters"]} == {"width", "blocks", "activation"}
    assert families["sine"]["source"] == "builtin" and families["sine"]["package"] is None
    assert networks["mlp"]["source"] == "builtin"
    assert not {"import_error", "bad_schema"} & (families.keys() | networks.keys())
    assert families["sine"]["description"].startswith("Sine regression")  # the built-in kept


def test_a_spec_naming_a_broken_plugin_or_a_bad_plugin_field_is_422_naming_the_field(
        server: ServerProcess):
    with server.client() as client:
        jobs_before = client.get("/v1/jobs").json()["data"]
        broken = client.post("/v1/jobs", json={**JOB, "task_family": {"name": "import_error"}})
        bad_field = client.post("/v1/jobs", json={**JOB, "model": {"name": "resmlp",
                                                                   "depth": 3}})
        jobs_after = client.get("/v1/jobs").json()["data"]
    assert broken.status_code == 422
    [detail] = broken.json()["error"]["details"]
    assert detail["field"] == "task_family"
    assert detail["message"] == (f"Value error, 'import_error' comes from the plugin package "
                                 f"{BROKEN_PACKAGE}, which is installed but could not be loaded "
                                 f"here: {BROKEN_ENTRIES['import_error'][2]}")
    assert bad_field.status_code == 422
    assert [d["field"] for d in bad_field.json()["error"]["details"]] == ["model.depth"]
    assert jobs_after == jobs_before  # nothing stored for either


def test_a_maml_job_on_the_plugin_family_and_network_succeeds_and_records_the_plugin(
        server: ServerProcess, finished_job: dict):
    with server.client() as client:
        document = client.get(f"/v1/jobs/{finished_job['id']}/artifacts/meta_init.json").json()
    assert [(p["kind"], p["name"], p["package"]) for p in document["plugins"]] == [
        ("task_family", "oscillator", EXAMPLE_PACKAGE), ("model", "resmlp", EXAMPLE_PACKAGE)]
    assert document["architecture"]["name"] == "resmlp"


def test_the_plugin_meta_init_loads_through_the_sdk_and_adaptation_lowers_the_error(
        server: ServerProcess, finished_job: dict, tmp_path: Path):
    tasks = fresh_tasks()
    with Client(url=server.url, api_key=server.admin_key) as client:
        model, recipe = client.load_meta_init(finished_job["id"])
    assert recipe["algorithm"] == "maml"
    before = after = 0.0
    for task in range(FRESH_TASKS):
        query_x, query_y = tasks.query_x[task], tasks.query_y[task]
        before += ((model(query_x) - query_y) ** 2).mean().item() / FRESH_TASKS
        adapted = model.adapt(tasks.support_x[task], tasks.support_y[task], steps=ADAPT_STEPS)
        after += ((adapted(query_x) - query_y) ** 2).mean().item() / FRESH_TASKS
    print(f"\nplugin job, SDK: query MSE unadapted {before:.4f}, "
          f"after {ADAPT_STEPS} steps {after:.4f}")
    assert after < 0.8 * before, (before, after)


def test_server_side_adaptation_of_the_plugin_meta_init_lowers_the_error(
        server: ServerProcess, finished_job: dict):
    tasks = fresh_tasks()
    errors = {0: 0.0, ADAPT_STEPS: 0.0}
    with server.client() as client:
        for task in range(FRESH_TASKS):
            for steps in errors:
                response = client.post(f"/v1/jobs/{finished_job['id']}/adapt", json={
                    "support_x": tasks.support_x[task].tolist(),
                    "support_y": tasks.support_y[task].tolist(),
                    "query_x": tasks.query_x[task].tolist(), "steps": steps}, timeout=120)
                assert response.status_code == 200, response.text
                predictions = torch.tensor(response.json()["predictions"])
                errors[steps] += ((predictions - tasks.query_y[task]) ** 2).mean().item()
    print(f"\nplugin job, POST /adapt: summed query MSE unadapted {errors[0]:.4f}, "
          f"after {ADAPT_STEPS} steps {errors[ADAPT_STEPS]:.4f}")
    assert errors[ADAPT_STEPS] < 0.8 * errors[0], errors
