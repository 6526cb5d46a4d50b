"""Fixtures of the reliability tests: the ASGI app on ``db_url`` with a small body limit, and
API keys of two users and an admin."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metaserve.api.app import create_app
from metaserve.service import artifacts, job_store
from metaserve.service.settings import Settings
from tests.helpers import TWO_LINE_SPEC, bearer, make_user

TEST_MAX_BODY_BYTES = 64 * 1024


@pytest.fixture
def artifact_root(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture
def client(engine, db_url: str, artifact_root: Path) -> Iterator[TestClient]:  # noqa: ANN001
    settings = Settings(database_url=db_url, dispatcher=False, artifact_root=artifact_root,
                        max_body_bytes=TEST_MAX_BODY_BYTES)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def alice_key(sessions) -> str:  # noqa: ANN001
    return make_user(sessions, "alice")[1]


@pytest.fixture
def bob_key(sessions) -> str:  # noqa: ANN001
    return make_user(sessions, "bob")[1]


@pytest.fixture
def admin_key(sessions) -> str:  # noqa: ANN001
    return make_user(sessions, "root", is_admin=True)[1]


def register_file(sessions, job_id: str, path: Path) -> None:  # noqa: ANN001
    """Record ``path`` (under the job's directory) as an artifact, as the dispatcher does."""
    described = artifacts.describe(path)
    with sessions.begin() as session:
        job_store.add_artifact(session=session, job_id=job_id, name=described.name,
                               size=described.size, sha256=described.sha256,
                               media_type=described.media_type)


@pytest.fixture
def alice_job(client, sessions, alice_key, artifact_root) -> str:  # noqa: ANN001
    """Alice's job, cancelled (so its event stream ends), with metrics and one artifact."""
    headers = bearer(alice_key)
    job_id = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=headers).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200
    with sessions.begin() as session:
        job_store.add_metrics(session=session, job_id=job_id, rows=[(1, "train/loss", 0.5)])
    recipe = artifacts.job_dir(artifact_root, job_id) / "meta_init.json"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(json.dumps({"recipe": {"algorithm": "maml"}}))
    register_file(sessions, job_id, recipe)
    return job_id
