"""Shared fixtures. Every database test runs on SQLite (a fresh file) and on PostgreSQL
(``METASERVE_TEST_DATABASE_URL``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).

PostgreSQL: one database named ``metaserve_test_<random>`` is created per test session on that
server and dropped at the end; each test starts from an empty ``public`` schema. When the
server is unreachable the PostgreSQL variants skip, except under ``CI`` where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from metaserve.service import auth
from metaserve.service.db import make_engine, session_factory
from metaserve.service.orm import Base, User

DEFAULT_TEST_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session."""
    server_url = make_url(os.environ.get("METASERVE_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL))
    admin_engine = create_engine(server_url, isolation_level="AUTOCOMMIT",
                                 connect_args={"connect_timeout": 5})
    try:
        with admin_engine.connect() as connection:
            name = f"metaserve_test_{uuid.uuid4().hex[:12]}"
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin_engine.dispose()
        reason = f"PostgreSQL at {server_url.render_as_string(hide_password=True)} unreachable: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield server_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin_engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin_engine.dispose()


def _empty_postgres_schema(url: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:  # noqa: ANN001
    """The URL of an empty database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'metaserve.db'}"
    url = request.getfixturevalue("postgres_database_url")
    _empty_postgres_schema(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on ``db_url`` with the schema of the table models created."""
    engine = make_engine(db_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session:
        yield session


def make_user(sessions: sessionmaker[Session], name: str, is_admin: bool = False) -> tuple[User, str]:
    with sessions() as session:
        return auth.create_key(session=session, name=name, is_admin=is_admin)


@pytest.fixture
def alice(sessions: sessionmaker[Session]) -> User:
    return make_user(sessions, "alice")[0]


@pytest.fixture
def bob(sessions: sessionmaker[Session]) -> User:
    return make_user(sessions, "bob")[0]


@pytest.fixture
def admin(sessions: sessionmaker[Session]) -> User:
    return make_user(sessions, "root", is_admin=True)[0]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance shared by every test of the session that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield
    ray.shutdown()
