from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metaserve.api.app import create_app
from metaserve.service import auth
from metaserve.service.settings import Settings
from metaserve.workers.engine import Trainer
from tests.helpers import SINE_SPEC

TEST_MAX_BODY_BYTES = 16 * 1024


@pytest.fixture
def artifact_root(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture
def max_body_bytes() -> int:
    """The body limit of ``client``: small, so 413 tests stay cheap (a module may override)."""
    return TEST_MAX_BODY_BYTES


@pytest.fixture
def client(engine, db_url: str, artifact_root: Path,  # noqa: ANN001
           max_body_bytes: int) -> Iterator[TestClient]:
    settings = Settings(database_url=db_url, dispatcher=False, artifact_root=artifact_root,
                        max_body_bytes=max_body_bytes)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def sine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of a real two-iteration sine MAML job (its meta_init.* files)."""
    directory = tmp_path_factory.mktemp("sine-run")
    Trainer(SINE_SPEC).run(directory)
    return directory


def _key(sessions, name: str, is_admin: bool = False) -> dict[str, str]:  # noqa: ANN001
    with sessions() as session:
        _, key = auth.create_key(session=session, name=name, is_admin=is_admin)
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def alice_auth(sessions) -> dict[str, str]:  # noqa: ANN001
    return _key(sessions, "alice")


@pytest.fixture
def bob_auth(sessions) -> dict[str, str]:  # noqa: ANN001
    return _key(sessions, "bob")


@pytest.fixture
def admin_auth(sessions) -> dict[str, str]:  # noqa: ANN001
    return _key(sessions, "root", is_admin=True)
