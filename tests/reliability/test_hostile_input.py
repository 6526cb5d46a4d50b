"""Hostile input: non-finite numbers in a spec, bodies over the limit (declared or streamed),
deeply nested and oversized JSON, event ids that overflow a database integer, and a pickle
planted where a checkpoint is expected. Each is refused with a 4xx (or fails the job with a
clear error) and changes nothing. Artifact-name traversal is in tests/api/test_metrics_artifacts.py.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metaserve.service import job_store, jobs
from metaserve.service.dispatcher import Dispatcher
from metaserve.service.orm import JobStatus
from metaserve.service.settings import MAX_BODY_BYTES, Settings
from tests.helpers import TWO_LINE_SPEC, bearer, number_paths, valid_specs
from tests.server_process import ServerProcess
from metaserve.workers.engine.loop import CHECKPOINT_DIRECTORY
from metaserve.workers.spec import ALGORITHMS, JobSpec

NON_FINITE = ("NaN", "Infinity", "-Infinity")  # what Python's JSON parser accepts


# --------------------------------------------------------------------------- NaN / infinity


def with_raw_number(spec: dict, path: tuple, literal: str) -> str:
    """The spec as JSON text with the number at ``path`` replaced by ``literal``."""
    copy = json.loads(json.dumps(spec))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "__POISON__"
    return json.dumps(copy).replace('"__POISON__"', literal)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # validation: no database
def test_non_finite_number_anywhere_in_a_spec_is_422_naming_that_field(client, alice_key):
    specs = valid_specs()
    assert {spec["algorithm"]["name"] for spec in specs} == set(ALGORITHMS)
    headers = {**bearer(alice_key), "Content-Type": "application/json"}
    answers, expected = {}, {}
    for spec in specs:
        for path in number_paths(spec):
            field = ".".join(str(part) for part in path)
            for literal in NON_FINITE:
                response = client.post("/v1/jobs", content=with_raw_number(spec, path, literal),
                                       headers=headers)
                error = response.json()["error"]
                answers[(spec["algorithm"]["name"], field, literal)] = (
                    response.status_code, error["code"],
                    field in {detail["field"] for detail in error["details"]})
                expected[(spec["algorithm"]["name"], field, literal)] = (
                    422, "validation_error", True)
    assert len(answers) > 100
    assert answers == expected
    assert client.get("/v1/jobs", headers=bearer(alice_key)).json()["data"] == []


@pytest.mark.dialects
def test_event_id_counters_beyond_a_database_integer_are_422(client, alice_job, alice_key):
    """Found by schemathesis: the metric id was compared in SQL and overflowed mid-stream."""
    for cursor in ("0-" + "9" * 60 + "-0", f"{10**18}-0-0", f"0-0-{10**18}"):
        response = client.get(f"/v1/jobs/{alice_job}/events", params={"after": cursor},
                              headers=bearer(alice_key))
        assert response.status_code == 422, cursor
        assert response.json()["error"]["details"] == [{"field": "last-event-id",
                                                        "message": cursor}]


# --------------------------------------------------------------------------- a live server


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``metaserve serve`` on its defaults (1 MiB body limit), without the dispatcher."""
    server = ServerProcess(tmp_path_factory.mktemp("hostile"), METASERVE_DISPATCHER="false")
    server.start()
    yield server
    server.terminate()


def read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_streamed_body_over_the_limit_is_413_before_it_is_read_whole(live_server):
    """A chunked body of 256 MiB without Content-Length: the server answers 413 and closes
    once the limit is passed; the client, sending as fast as the socket takes it, has sent a
    small part of it when the answer comes."""
    total, chunk = 256 * 1024 * 1024, b"x" * 65536
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {live_server.admin_key}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    sent = 0
    with socket.create_connection(("127.0.0.1", live_server.port)) as sock:
        sock.sendall(head)
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        response = read_response(sock)
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"
    assert json.loads(rest.partition(b"\r\n\r\n")[2]) == {"error": {
        "code": "payload_too_large",
        "message": f"request body is larger than the limit of {MAX_BODY_BYTES} bytes",
        "details": []}}
    assert sent < 16 * MAX_BODY_BYTES < total  # the limit plus what the socket buffers hold


def test_declared_body_over_the_limit_is_413_before_any_of_it_is_sent(live_server):
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {live_server.admin_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", live_server.port)) as sock:
        sock.sendall(head.encode())
        response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 413 ")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [900, 5_000, 400_000])
def test_deeply_nested_json_is_a_4xx_never_a_5xx(live_server, depth):
    with httpx.Client(base_url=live_server.url, timeout=30,
                      headers={**bearer(live_server.admin_key),
                               "Content-Type": "application/json"}) as client:
        job_id = client.post("/v1/jobs", json=TWO_LINE_SPEC).json()["id"]
        statuses = {
            "job": client.post("/v1/jobs", content=nested(depth)).status_code,
            "hidden": client.post("/v1/jobs", content=json.dumps(
                {**TWO_LINE_SPEC, "model": {"name": "mlp", "hidden": "@"}}).replace(
                '"@"', nested(depth))).status_code,
            "object": client.post("/v1/jobs", content='{"a":' * depth + "1"
                                  + "}" * depth).status_code,
            "adapt": client.post(f"/v1/jobs/{job_id}/adapt", content=json.dumps(
                {"support_x": "@", "support_y": [[0]], "query_x": [[0]]}).replace(
                '"@"', nested(depth))).status_code,
        }
        assert client.get("/healthz").status_code == 200
    assert all(400 <= status < 500 for status in statuses.values()), statuses


def test_huge_adapt_arrays_are_413_or_422_naming_the_array(live_server):
    with httpx.Client(base_url=live_server.url, timeout=30,
                      headers=bearer(live_server.admin_key)) as client:
        job_id = client.post("/v1/jobs", json=TWO_LINE_SPEC).json()["id"]
        too_many_numbers = client.post(f"/v1/jobs/{job_id}/adapt", json={
            "support_x": [[0] * 250_001], "support_y": [[0]], "query_x": [[0]]})
        too_many_rows = client.post(f"/v1/jobs/{job_id}/adapt", json={
            "support_x": [[0]], "support_y": [[0]], "query_x": [[0]] * 1001})
        over_the_body_limit = client.post(f"/v1/jobs/{job_id}/adapt", json={
            "support_x": [[0.123456789] * 200_000], "support_y": [[0]], "query_x": [[0]]})
    assert (too_many_numbers.status_code, too_many_numbers.json()["error"]["details"]) == (
        413, [{"field": "support_x", "message": "at most 250000 numbers"}])
    assert too_many_rows.status_code == 422
    assert [d["field"] for d in too_many_rows.json()["error"]["details"]] == ["query_x"]
    assert over_the_body_limit.status_code == 413


# --------------------------------------------------------------------------- planted pickle


class _WritesMarkerWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def wait_for_terminal(sessions, job_id: str, owner, timeout: float):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        with sessions.begin() as session:
            job = job_store.get_job_row(session=session, job_id=job_id, owner=owner)
        if JobStatus(job.status).is_terminal() or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


@pytest.mark.ray
def test_pickle_planted_as_the_checkpoint_is_never_loaded_and_fails_the_job(
        ray_session, sessions, db_url, tmp_path, alice):  # noqa: ANN001
    spec = JobSpec.model_validate({**TWO_LINE_SPEC, "iterations": 4, "meta_batch_size": 2,
                                   "checkpoint_every": 2, "max_attempts": 1,
                                   "evaluation": {"every": 2, "tasks": 2}})
    with sessions() as session:
        job, _ = jobs.submit_job(session=session, owner=alice, spec=spec)
    settings = Settings(database_url=db_url, artifact_root=tmp_path / "artifacts",
                        dispatcher_concurrency=1)
    checkpoint = Path(settings.artifact_root) / job.id / CHECKPOINT_DIRECTORY
    checkpoint.mkdir(parents=True)
    marker = tmp_path / "unpickled"
    (checkpoint / "checkpoint.safetensors").write_bytes(
        pickle.dumps({"params/layers.0.weight": _WritesMarkerWhenUnpickled(marker)}))
    (checkpoint / "checkpoint.json").write_text(json.dumps({"format": 1, "iteration": 2,
                                                            "spec": spec.model_dump()}))
    dispatcher = Dispatcher(settings, sessions, worker_id="pickle-test")
    dispatcher.start()
    try:
        finished = wait_for_terminal(sessions, job.id, alice, timeout=120)
    finally:
        dispatcher.stop()
    assert (finished.status, finished.attempt) == ("failed", 1)
    assert finished.error.startswith(f"CheckpointError: {checkpoint}: not a valid safetensors "
                                     "+ JSON checkpoint, refusing to resume from it")
    assert not marker.exists()
    assert not (Path(settings.artifact_root) / job.id / "meta_init.safetensors").exists()
