"""The SDK against the real API served by uvicorn in a thread (SQLite and PostgreSQL; no
dispatcher, so jobs stay where the test puts them)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from metaserve import client as sdk
from metaserve.client import Client, Event, parse_sse
from metaserve.workers.engine import Trainer
from metaserve.workers.engine.final_artifact import adapt, load_meta_init

TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}


@pytest.fixture(autouse=True)
def isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config" / "config.toml"
    monkeypatch.setenv("METASERVE_CONFIG", str(path))
    monkeypatch.delenv("METASERVE_URL", raising=False)
    monkeypatch.delenv("METASERVE_API_KEY", raising=False)
    return path


def test_api_errors_arrive_as_typed_exceptions_with_the_servers_message(live_url: str, key: str) -> None:  # noqa: F811
    with Client(live_url, "ms_wrong") as stranger, Client(live_url, key) as client:
        with pytest.raises(sdk.Unauthorized) as unauthorized:
            stranger.list()
        with pytest.raises(sdk.NotFound) as not_found:
            client.get("01ARZ3NDEKTSV4RRFFQ69G5FAV")
        with pytest.raises(sdk.InvalidRequest) as invalid:
            client.submit({"algorithm": {"name": "maml", "inner_lr": -1}, "task_family": {"name": "sine"}})
        job = client.submit(TWO_LINE_SPEC)
        client.cancel(job)
        with pytest.raises(sdk.Conflict) as conflict:
            client.cancel(job)
    assert (unauthorized.value.status_code, unauthorized.value.code) == (401, "unauthorized")
    assert not_found.value.message == "Job not found."
    assert invalid.value.message == "invalid request: algorithm.inner_lr"
    assert [d["field"] for d in invalid.value.details] == ["algorithm.inner_lr"]
    assert str(conflict.value) == (f"job {job['id']} is cancelled; it cannot be cancelled "
                                   f"(409 invalid_transition)")


def test_a_client_without_arguments_reads_the_config_file_written_by_login(
        live_url: str, key: str, isolated_config: Path) -> None:  # noqa: F811
    sdk.write_config(url=live_url, api_key=key)
    with Client() as client:
        assert (client.url, client.api_key) == (live_url, key)
        assert client.list() == []
    assert stat.S_IMODE(isolated_config.stat().st_mode) == 0o600
    assert sdk.read_config() == {"url": live_url, "api_key": key}


def test_no_key_anywhere_is_a_not_configured_error_at_the_first_request() -> None:
    client = Client()
    with pytest.raises(sdk.NotConfigured, match="run `metaserve login`"):
        client.list()
    with pytest.raises(sdk.NotConfigured, match="run `metaserve login`"):
        list(client.events("01JOB"))


def test_submit_a_yaml_file_with_overrides_then_list_get_and_follow_it_to_its_end(
        live_url: str, key: str, tmp_path: Path) -> None:  # noqa: F811
    spec = tmp_path / "job.yaml"
    spec.write_text("name: mine\nalgorithm: {name: reptile}\ntask_family: {name: sine}\n")
    with Client(live_url, key) as client:
        job = client.submit(spec, overrides=["iterations=7", "algorithm.inner_steps=3"])
        listed = client.list(status="queued")
        client.cancel(job)
        events: list[Event] = []
        final = client.wait(job, progress=False, on_event=events.append)
    assert (job["name"], job["spec"]["iterations"], job["spec"]["algorithm"]["inner_steps"]) == (
        "mine", 7, 3)
    assert [found["id"] for found in listed] == [job["id"]]
    assert final["status"] == "cancelled"
    assert [(e.id, e.kind, e.data["status"]) for e in events] == [
        ("1-0-0", "status", "queued"), ("2-0-0", "status", "cancelled")]


def test_a_missing_spec_file_is_a_client_error_naming_it(live_url: str, key: str) -> None:  # noqa: F811
    with Client(live_url, key) as client, pytest.raises(sdk.MetaserveClientError) as error:
        client.submit("no/such.yaml")
    assert str(error.value) == "cannot read no/such.yaml: No such file or directory"


def test_parse_sse_reads_ids_kinds_and_multi_line_data_and_skips_comments() -> None:
    lines = ["retry: 1000", "", ": keep-alive", "", "id: 1-0-0", "event: status",
             'data: {"status":', 'data: "queued"}', "", "id: 1-5-0", "event: metrics",
             'data: {"step": 10}', ""]
    assert list(parse_sse(iter(lines))) == [Event("1-0-0", "status", {"status": "queued"}),
                                            Event("1-5-0", "metrics", {"step": 10})]


def test_load_meta_init_and_adapt_work_offline_on_a_downloaded_directory(tmp_path: Path) -> None:
    spec = {**TWO_LINE_SPEC, "iterations": 2, "evaluation": {"every": 0, "tasks": 2, "inner_steps": [1]}}
    Trainer(spec).run(tmp_path)
    support_x = torch.linspace(-5, 5, 10).unsqueeze(1)
    support_y, query_x = torch.sin(support_x), torch.linspace(-4, 4, 7).unsqueeze(1)

    model, recipe = sdk.load_meta_init(tmp_path)
    predictions = Client.adapt(model, support_x, support_y, steps=3)(query_x)

    engine_model, engine_recipe = load_meta_init(tmp_path)
    assert recipe == engine_recipe
    with Client() as offline:  # no server, no API key anywhere (the autouse fixture)
        offline_model, offline_recipe = offline.load_meta_init(tmp_path)
        offline_predictions = offline.adapt(offline_model, support_x, support_y, steps=3)(query_x)
    assert offline_recipe == recipe
    assert torch.equal(offline_predictions, predictions)
    assert torch.equal(predictions, adapt(engine_model, support_x, support_y, 3)(query_x))
    with pytest.raises(sdk.MetaserveClientError, match="has no meta_init.safetensors, meta_init.json"):
        sdk.load_meta_init(tmp_path / "empty")
