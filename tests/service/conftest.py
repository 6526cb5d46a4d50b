"""Fixtures of the service tests: a user's key and a CLI configured against ``live_url`` (the
client CLI and SDK modules), and a dispatcher on the session's Ray (the dispatcher and job-log
modules)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from metaserve.service.dispatcher import Dispatcher
from metaserve.service.settings import Settings
from tests.helpers import make_user


@pytest.fixture
def key(sessions) -> str:  # noqa: ANN001
    """Alice's API key."""
    return make_user(sessions, "alice")[1]


@pytest.fixture
def artifact_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The live server's artifact store (its settings come from the environment)."""
    root = tmp_path / "artifacts"
    monkeypatch.setenv("METASERVE_ARTIFACT_ROOT", str(root))
    return root


@pytest.fixture
def isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI's config file, in this test's directory, and no server or key from the
    environment."""
    path = tmp_path / "config.toml"
    monkeypatch.setenv("METASERVE_CONFIG", str(path))
    monkeypatch.delenv("METASERVE_URL", raising=False)
    monkeypatch.delenv("METASERVE_API_KEY", raising=False)
    return path


@pytest.fixture
def logged_in(live_url: str, key: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``live_url``, with the CLI pointed at it as alice (through the environment)."""
    monkeypatch.setenv("METASERVE_URL", live_url)
    monkeypatch.setenv("METASERVE_API_KEY", key)
    return live_url


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    """The dispatcher's settings: ``db_url``, artifacts under ``tmp_path``, two jobs at once."""
    return Settings(database_url=db_url, artifact_root=tmp_path / "artifacts",
                    data_dir=tmp_path, dispatcher_concurrency=2)


@pytest.fixture
def dispatcher(settings: Settings, sessions) -> Iterator[Dispatcher]:  # noqa: ANN001
    dispatcher = Dispatcher(settings, sessions)
    dispatcher.start()
    yield dispatcher
    dispatcher.stop()
