"""``/v1/models`` on SQLite and PostgreSQL: registered models, versions numbered under
concurrency, aliases that move, owner scoping, downloads by version and alias, and the SDK's
``models:/`` URIs. Succeeded jobs are made as the dispatcher makes them (tests.helpers)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from metaserve.client import Client, Conflict, InvalidRequest, NotFound
from metaserve.service import claims, job_store, registered_models
from metaserve.service.auth import hash_key
from metaserve.service.orm import Job, JobStatus, ModelAlias, ModelVersion, RegisteredModel, User
from metaserve.workers.engine.final_artifact import adapt, load_meta_init
from tests.helpers import LEASE_S, SINE_SPEC, WORKER, sine_task, succeeded_job

pytestmark = pytest.mark.dialects  # numbering under concurrency, constraints: each database's


@pytest.fixture
def succeeded(client, sessions, alice_auth, sine_run, artifact_root):  # noqa: ANN001, ANN201
    """Makes one of alice's succeeded sine jobs (its meta_init.* registered) per call."""
    return lambda auth=alice_auth: succeeded_job(client, sessions, auth, SINE_SPEC, sine_run,
                                                 artifact_root)


def create(client, auth, name="sine", **body):  # noqa: ANN001, ANN201
    return client.post("/v1/models", json={"name": name, **body}, headers=auth)


def register(client, auth, job_id, name="sine"):  # noqa: ANN001, ANN201
    return client.post(f"/v1/models/{name}/versions", json={"job_id": job_id}, headers=auth)


def user_of(sessions, auth: dict[str, str]) -> User:  # noqa: ANN001
    key_hash = hash_key(auth["Authorization"].removeprefix("Bearer "))
    with sessions() as session:
        return session.scalars(select(User).where(User.key_hash == key_hash)).one()


def stored_counts(sessions) -> tuple[int, int, int]:  # noqa: ANN001
    with sessions() as session:
        return tuple(len(session.scalars(select(table)).all())
                     for table in (RegisteredModel, ModelVersion, ModelAlias))


# --------------------------------------------------------------------------- models


def test_create_then_get_and_list_a_model_with_no_versions(client, alice_auth):
    response = create(client, alice_auth, description="sine MAML, kept")
    assert response.status_code == 201
    assert response.headers["location"] == "/v1/models/sine"
    body = response.json()
    assert {key: body[key] for key in ("name", "description", "latest_version", "version_count",
                                       "aliases")} == {
        "name": "sine", "description": "sine MAML, kept", "latest_version": None,
        "version_count": 0, "aliases": {}}
    assert client.get("/v1/models/sine", headers=alice_auth).json() == body
    assert client.get("/v1/models", headers=alice_auth).json() == {"data": [body]}


def test_a_second_model_of_the_same_name_is_409_and_stores_nothing(client, sessions, alice_auth):
    create(client, alice_auth)
    response = create(client, alice_auth)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "already_exists"
    assert response.json()["error"]["details"] == [
        {"field": "name", "message": "you already have a model named 'sine'"}]
    assert stored_counts(sessions) == (1, 0, 0)


@pytest.mark.parametrize("name", ["", "has/slash", "at@sign", "-leading-dash", "x" * 101,
                                  "spa ce"])
def test_a_name_that_cannot_be_a_uri_segment_is_422_naming_it(client, sessions, alice_auth, name):
    response = create(client, alice_auth, name=name)
    assert response.status_code == 422
    assert [detail["field"] for detail in response.json()["error"]["details"]] == ["name"]
    assert stored_counts(sessions) == (0, 0, 0)


def test_models_are_scoped_to_their_owner(client, alice_auth, bob_auth, admin_auth, succeeded):
    create(client, alice_auth)
    alice_job = succeeded()
    assert register(client, alice_auth, alice_job).status_code == 201
    for auth in (bob_auth, admin_auth):  # names are per owner: an admin's "sine" is their own
        assert client.get("/v1/models/sine", headers=auth).status_code == 404
        assert client.get("/v1/models/sine/versions/1", headers=auth).status_code == 404
        assert client.get("/v1/models", headers=auth).json() == {"data": []}
        assert client.get("/v1/models/sine/versions/1/artifacts/meta_init.json",
                          headers=auth).status_code == 404
    # Bob may use the same name, and cannot register alice's job into his model.
    assert create(client, bob_auth).status_code == 201
    response = register(client, bob_auth, alice_job)
    assert response.status_code == 404
    assert response.json()["error"]["details"] == [{"field": "job_id", "message": alice_job}]
    assert client.get("/v1/models/sine", headers=bob_auth).json()["latest_version"] is None


# --------------------------------------------------------------------------- versions


def test_versions_are_numbered_from_one_and_name_their_job(client, alice_auth, succeeded):
    create(client, alice_auth)
    first, second = succeeded(), succeeded()
    response = register(client, alice_auth, first)
    assert response.status_code == 201
    assert response.headers["location"] == "/v1/models/sine/versions/1"
    version = response.json()
    assert {key: version[key] for key in ("name", "version", "job_id", "sweep_id",
                                          "artifact_kind", "aliases", "uri")} == {
        "name": "sine", "version": 1, "job_id": first, "sweep_id": None,
        "artifact_kind": "meta_init", "aliases": [], "uri": "models:/sine/1"}
    assert register(client, alice_auth, second).json()["version"] == 2
    assert client.get("/v1/models/sine/versions/1", headers=alice_auth).json() == version
    listed = client.get("/v1/models/sine/versions", headers=alice_auth).json()["data"]
    assert [(v["version"], v["job_id"]) for v in listed] == [(2, second), (1, first)]
    assert client.get("/v1/models/sine", headers=alice_auth).json()["latest_version"] == 2


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED])
def test_a_job_that_has_not_succeeded_is_409_naming_job_id_and_uses_no_number(
        client, sessions, alice_auth, succeeded, status):
    create(client, alice_auth)
    good = succeeded()  # first: the claim below must take the job under test
    job_id = client.post("/v1/jobs", json=SINE_SPEC, headers=alice_auth).json()["id"]
    if status is not JobStatus.QUEUED:
        with sessions() as session, session.begin():
            assert claims.claim_next_job(session=session, worker_id=WORKER,
                                         lease_s=LEASE_S).id == job_id
            if status is JobStatus.FAILED:
                job_store.finish_job(session=session, job_id=job_id, worker_id=WORKER,
                                     status=status)
    response = register(client, alice_auth, job_id)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "not_ready"
    assert response.json()["error"]["details"] == [{
        "field": "job_id",
        "message": f"job {job_id} is {status.value}; only a succeeded job can become a model "
                   "version"}]
    assert stored_counts(sessions) == (1, 0, 0)
    assert register(client, alice_auth, good).json()["version"] == 1


def test_a_succeeded_job_without_a_final_artifact_is_409(client, sessions, alice_auth):
    create(client, alice_auth)
    job_id = client.post("/v1/jobs", json=SINE_SPEC, headers=alice_auth).json()["id"]
    with sessions() as session, session.begin():
        claims.claim_next_job(session=session, worker_id=WORKER, lease_s=LEASE_S)
        job_store.finish_job(session=session, job_id=job_id, worker_id=WORKER,
                             status=JobStatus.SUCCEEDED)
    response = register(client, alice_auth, job_id)
    assert response.status_code == 409
    assert response.json()["error"]["details"][0]["field"] == "job_id"
    assert stored_counts(sessions) == (1, 0, 0)


@pytest.mark.parametrize("body", [{}, {"job_id": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
                                       "sweep_id": "sw_01ARZ3NDEKTSV4RRFFQ69G5FAV"}])
def test_a_version_needs_exactly_one_of_job_id_and_sweep_id(client, sessions, alice_auth, body):
    create(client, alice_auth)
    response = client.post("/v1/models/sine/versions", json=body, headers=alice_auth)
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["message"] == (
        "Value error, give exactly one of job_id and sweep_id")
    assert stored_counts(sessions) == (1, 0, 0)


def test_a_version_of_a_missing_model_is_404_naming_it(client, alice_auth, succeeded):
    response = register(client, alice_auth, succeeded(), name="nope")
    assert response.status_code == 404
    assert response.json()["error"]["details"] == [{"field": "name", "message": "nope"}]


def test_two_registrations_at_once_get_different_numbers(sessions, succeeded, alice_auth,
                                                         client):
    create(client, alice_auth)
    # As many as SQLite's pool holds (4): each registration waits on the others' write, not
    # for a connection.
    job_ids = [succeeded() for _ in range(4)]
    owner = user_of(sessions, alice_auth)
    start = threading.Barrier(len(job_ids))
    numbers: dict[str, int] = {}
    errors: list[BaseException] = []

    def register_one(job_id: str) -> None:
        try:
            start.wait()
            with sessions() as session:
                view = registered_models.register_version(session=session, owner=owner,
                                                          name="sine", job_id=job_id)
                numbers[job_id] = view.version.version
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=register_one, args=(job_id,)) for job_id in job_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(numbers.values()) == [1, 2, 3, 4]
    stored = client.get("/v1/models/sine/versions", headers=alice_auth).json()["data"]
    assert {(v["job_id"], v["version"]) for v in stored} == set(numbers.items())


def test_a_deleted_versions_number_is_not_given_again_and_its_aliases_go(
        client, alice_auth, succeeded):
    create(client, alice_auth)
    register(client, alice_auth, succeeded())
    register(client, alice_auth, succeeded())
    client.put("/v1/models/sine/aliases/production", json={"version": 2}, headers=alice_auth)
    assert client.delete("/v1/models/sine/versions/2", headers=alice_auth).status_code == 204
    assert client.get("/v1/models/sine/aliases/production",
                      headers=alice_auth).status_code == 404
    assert register(client, alice_auth, succeeded()).json()["version"] == 3


def test_a_job_a_version_uses_cannot_be_deleted(client, sessions, alice_auth, succeeded):
    create(client, alice_auth)
    job_id = succeeded()
    register(client, alice_auth, job_id)
    with sessions() as session:
        assert registered_models.versions_of_job(session=session, job_id=job_id) == [("sine", 1)]
        with pytest.raises(IntegrityError):
            session.execute(delete(Job).where(Job.id == job_id))
            session.commit()
        session.rollback()
        assert session.get(Job, job_id) is not None


def test_deleting_a_model_keeps_its_jobs(client, sessions, alice_auth, succeeded):
    create(client, alice_auth)
    job_id = succeeded()
    register(client, alice_auth, job_id)
    client.put("/v1/models/sine/aliases/production", json={"version": 1}, headers=alice_auth)
    assert client.delete("/v1/models/sine", headers=alice_auth).status_code == 204
    assert stored_counts(sessions) == (0, 0, 0)
    assert client.get(f"/v1/jobs/{job_id}", headers=alice_auth).json()["status"] == "succeeded"


def test_deleting_the_owner_takes_models_versions_and_jobs_in_one_statement(
        client, sessions, alice_auth, succeeded):
    create(client, alice_auth)
    job_id = succeeded()
    register(client, alice_auth, job_id)
    with sessions() as session:
        session.execute(delete(User).where(User.id == user_of(sessions, alice_auth).id))
        session.commit()
        assert session.get(Job, job_id) is None
    assert stored_counts(sessions) == (0, 0, 0)


# --------------------------------------------------------------------------- aliases


def test_an_alias_points_at_a_version_and_moves(client, alice_auth, succeeded):
    create(client, alice_auth)
    first, second = succeeded(), succeeded()
    register(client, alice_auth, first)
    register(client, alice_auth, second)
    response = client.put("/v1/models/sine/aliases/production", json={"version": 1},
                          headers=alice_auth)
    assert response.status_code == 200
    assert (response.json()["version"], response.json()["aliases"]) == (1, ["production"])
    assert client.get("/v1/models/sine/aliases/production",
                      headers=alice_auth).json()["job_id"] == first
    client.put("/v1/models/sine/aliases/production", json={"version": 2}, headers=alice_auth)
    assert client.get("/v1/models/sine/aliases/production",
                      headers=alice_auth).json()["job_id"] == second
    assert client.get("/v1/models/sine/versions/1", headers=alice_auth).json()["aliases"] == []
    assert client.get("/v1/models/sine", headers=alice_auth).json()["aliases"] == {
        "production": 2}
    assert client.delete("/v1/models/sine/aliases/production",
                         headers=alice_auth).status_code == 204
    response = client.get("/v1/models/sine/aliases/production", headers=alice_auth)
    assert response.status_code == 404
    assert response.json()["error"]["details"] == [
        {"field": "alias", "message": "sine has no alias 'production'"}]


def test_an_alias_to_a_missing_version_is_404_and_stores_nothing(client, sessions, alice_auth,
                                                                succeeded):
    create(client, alice_auth)
    register(client, alice_auth, succeeded())
    response = client.put("/v1/models/sine/aliases/production", json={"version": 7},
                          headers=alice_auth)
    assert response.status_code == 404
    assert response.json()["error"]["details"] == [
        {"field": "version", "message": "sine has no version 7"}]
    assert stored_counts(sessions) == (1, 1, 0)


@pytest.mark.parametrize(("alias", "field"), [("latest", "alias"), ("v3", "alias"),
                                              ("3", "alias"), ("has.dot", "alias")])
def test_an_alias_that_reads_as_a_version_or_is_malformed_is_422(client, sessions, alice_auth,
                                                                 succeeded, alias, field):
    create(client, alice_auth)
    register(client, alice_auth, succeeded())
    response = client.put(f"/v1/models/sine/aliases/{alias}", json={"version": 1},
                          headers=alice_auth)
    assert response.status_code == 422
    assert [detail["field"] for detail in response.json()["error"]["details"]] == [field]
    assert stored_counts(sessions) == (1, 1, 0)


# --------------------------------------------------------------------------- downloads, SDK


def test_a_versions_files_download_by_number_and_by_alias(client, alice_auth, succeeded,
                                                          sine_run):
    create(client, alice_auth)
    register(client, alice_auth, succeeded())
    client.put("/v1/models/sine/aliases/production", json={"version": 1}, headers=alice_auth)
    expected = (sine_run / "meta_init.safetensors").read_bytes()
    for path in ("/v1/models/sine/versions/1/artifacts/meta_init.safetensors",
                 "/v1/models/sine/aliases/production/artifacts/meta_init.safetensors"):
        response = client.get(path, headers=alice_auth)
        assert response.status_code == 200
        assert response.content == expected
    response = client.get("/v1/models/sine/versions/1/artifacts/checkpoint.safetensors",
                          headers=alice_auth)
    assert response.status_code == 404  # a job's checkpoints are not the version's


def test_sdk_register_alias_load_by_alias_and_adapt(client, sine_run, succeeded, sessions,
                                                    tmp_path: Path, alice_auth):
    key = alice_auth["Authorization"].removeprefix("Bearer ")
    # The SDK over the test app's own transport: the same requests, no socket.
    with Client("http://testserver", key, transport=client._transport) as sdk:
        first, second = succeeded(), succeeded()
        version = sdk.register_model("sine", job=first)  # creates the model, as MLflow does
        assert (version["version"], version["uri"]) == (1, "models:/sine/1")
        assert sdk.register_model("sine", job=second)["version"] == 2
        sdk.set_model_alias("sine", "production", 1)
        model, recipe = sdk.load_meta_init("models:/sine@production", cache_dir=tmp_path)
        support_x, support_y, query_x = sine_task(seed=3)
        expected_model, _ = load_meta_init(sine_run)
        torch.testing.assert_close(adapt(model, support_x, support_y)(query_x),
                                   adapt(expected_model, support_x, support_y)(query_x))
        assert (tmp_path / first / "meta_init.safetensors").exists()
        served = sdk.adapt_remote("models:/sine@production", support_x=support_x,
                                  support_y=support_y, query_x=query_x)
        assert served["algorithm"] == "maml" and len(served["predictions"]) == len(query_x)
        sdk.set_model_alias("sine", "production", 2)  # the next load follows the alias
        sdk.load_meta_init("models:/sine@production", cache_dir=tmp_path)
        assert (tmp_path / second / "meta_init.safetensors").exists()
        assert sdk.resolve_model_uri("models:/sine/latest")["job_id"] == second
        assert sdk.resolve_model_uri("models:/sine/1")["job_id"] == first
        assert [m["aliases"] for m in sdk.models()] == [{"production": 2}]
        with pytest.raises(Conflict):
            sdk.create_model("sine")
        with pytest.raises(NotFound) as missing:
            sdk.register_model("sine", job="01ARZ3NDEKTSV4RRFFQ69G5FAV")
        assert [d["field"] for d in missing.value.details] == ["job_id"]
        with pytest.raises(InvalidRequest):
            sdk.set_model_alias("sine", "latest", 1)
        queued = client.post("/v1/jobs", json=SINE_SPEC, headers=alice_auth).json()["id"]
        with pytest.raises(Conflict):  # not succeeded: the model it made for it goes again
            sdk.register_model("other", job=queued)
        assert [m["name"] for m in sdk.models()] == ["sine"]
    assert recipe["algorithm"] == "maml"


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("GET", "/v1/models/sine/versions/2147483648", None, "version"),
    ("PUT", "/v1/models/sine/aliases/production", {"version": 2**31}, "version"),
    ("POST", "/v1/models", {"name": "other", "description": "a\x00b"}, "description"),
])
def test_values_a_column_cannot_hold_are_422_naming_the_field(client, sessions, alice_auth,
                                                              method, path, body, field):
    create(client, alice_auth)
    response = client.request(method, path, json=body, headers=alice_auth)
    assert response.status_code == 422
    assert [detail["field"] for detail in response.json()["error"]["details"]] == [field]
    assert stored_counts(sessions) == (1, 0, 0)
