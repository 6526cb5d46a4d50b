"""Shared fixtures, and the test tiers.

Databases. A database test (one that uses ``db_url``, ``engine``, ``sessions``, ...) runs on
SQLite. Where the SQL differs between dialects (claims and row locks, constraints, text with
control characters, migrations, filters), its module or test is marked ``dialects`` and it runs
on PostgreSQL too (``METASERVE_TEST_DATABASE_URL``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). The schema of the table models is built
once per session (per xdist worker): a SQLite test gets a copy of that file, a PostgreSQL test
the session's database with every table emptied. A test that asks for ``db_url`` without
``engine`` (migrations) gets an empty database. PostgreSQL databases are named
``metaserve_test_<random>`` and dropped at the end; when the server is unreachable the
PostgreSQL variants skip, except under ``CI`` where they fail.

Tiers. Markers say what a test needs; those of the fixtures are applied here at collection
(``TIER_OF_FIXTURE``): ``postgres`` (the PostgreSQL variant), ``ray`` (uses ``ray_session``),
``server`` (a server process or port: ``live_url``, ``moto_s3``, a module's ``server`` or
``live_server`` fixture; a test that starts ``ServerProcess`` itself is marked by hand, and
fails under ``make test-fast`` when it is not), ``cluster`` (tests/cluster) and ``slow``
(marked by hand: minutes of its own, or waits on timeouts by design). ``make test-fast`` runs
what needs none of them on two xdist workers; ``make test`` runs everything, serially.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from metaserve.service.db import make_engine, session_factory
from metaserve.service.orm import Base, User
from tests.helpers import make_user
from tests.moto_s3 import MotoS3, moto_s3_server
from tests.server_process import free_port

DEFAULT_TEST_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DIALECTS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
# The marker a fixture gives every test that uses it (directly or through another fixture).
TIER_OF_FIXTURE = {"ray_session": "ray", "live_url": "server", "live_server": "server",
                   "server": "server", "moto_s3": "server", "cluster": "cluster"}
# An emptied PostgreSQL database must not wait forever on a lock a broken test left behind.
TRUNCATE_LOCK_TIMEOUT = "10s"


def _parametrized_names(metafunc: pytest.Metafunc) -> set[str]:
    names: set[str] = set()
    for marker in metafunc.definition.iter_markers("parametrize"):
        argnames = marker.args[0] if marker.args else marker.kwargs["argnames"]
        if isinstance(argnames, str):
            argnames = argnames.split(",")
        names.update(name.strip() for name in argnames)
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A database test runs on SQLite, and on PostgreSQL too where it is marked ``dialects``."""
    if "db_url" not in metafunc.fixturenames or "db_url" in _parametrized_names(metafunc):
        return
    dialects = DIALECTS if metafunc.definition.get_closest_marker("dialects") else ["sqlite"]
    metafunc.parametrize("db_url", dialects, indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in TIER_OF_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
        if Path(item.path).parent.name == "cluster":
            item.add_marker("cluster")


def _create_database(admin_engine: Engine, server_url) -> str:  # noqa: ANN001
    """A new database on the PostgreSQL server; skips (fails under ``CI``) when unreachable."""
    name = f"metaserve_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin_engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        reason = f"PostgreSQL at {server_url.render_as_string(hide_password=True)} unreachable: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return name


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator:
    """Creates databases on the test PostgreSQL server and drops them at the session's end."""
    server_url = make_url(os.environ.get("METASERVE_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL))
    admin_engine = create_engine(server_url, isolation_level="AUTOCOMMIT",
                                 connect_args={"connect_timeout": 5})
    created: list[str] = []

    def create() -> str:
        created.append(_create_database(admin_engine, server_url))
        return server_url.set(database=created[-1]).render_as_string(hide_password=False)

    try:
        yield create
    finally:
        if created:
            with admin_engine.connect() as connection:
                for name in created:
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin_engine.dispose()


@pytest.fixture(scope="session")
def postgres_database_url(postgres_databases) -> str:  # noqa: ANN001
    """A PostgreSQL database of this session, for tests that build their own schema."""
    return postgres_databases()


@pytest.fixture(scope="session")
def postgres_schema_url(postgres_databases) -> str:  # noqa: ANN001
    """A PostgreSQL database of this session holding the table models' schema."""
    url = postgres_databases()
    engine = make_engine(url)
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def sqlite_schema_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file holding the table models' schema, copied by each test that needs one."""
    path = tmp_path_factory.mktemp("schema") / "metaserve.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()  # the last connection's close folds the WAL into the file
    return path


def _empty_postgres_schema(url: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


def _empty_postgres_tables(url: str) -> None:
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f"SET lock_timeout = '{TRUNCATE_LOCK_TIMEOUT}'"))
            connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a database on the test's dialect (``sqlite`` or ``postgres``): holding the
    table models' schema and no rows when the test uses ``engine``, empty otherwise."""
    with_schema = "engine" in request.fixturenames
    if request.param == "sqlite":
        path = tmp_path / "metaserve.db"
        if with_schema:
            shutil.copyfile(request.getfixturevalue("sqlite_schema_file"), path)
        return f"sqlite:///{path}"
    if with_schema:
        url = request.getfixturevalue("postgres_schema_url")
        _empty_postgres_tables(url)
        return url
    url = request.getfixturevalue("postgres_database_url")
    _empty_postgres_schema(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on ``db_url`` with the schema of the table models (created here when a module's
    own ``db_url`` gives an empty database)."""
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


@pytest.fixture
def alice(sessions: sessionmaker[Session]) -> User:
    return make_user(sessions, "alice")[0]


@pytest.fixture
def bob(sessions: sessionmaker[Session]) -> User:
    return make_user(sessions, "bob")[0]


@pytest.fixture
def admin(sessions: sessionmaker[Session]) -> User:
    return make_user(sessions, "root", is_admin=True)[0]


@pytest.fixture
def live_url(engine, db_url: str) -> Iterator[str]:  # noqa: ANN001
    """The API on ``db_url`` served by uvicorn on a free port, in a thread of this process."""
    import uvicorn  # here, not at the top: a test of the engine must not need the API to import

    from metaserve.api.app import create_app
    from metaserve.service.settings import Settings

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Settings(database_url=db_url, dispatcher=False)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=20)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """An S3 endpoint (moto, a process on a free port) with its bucket, for the session; tests
    keep apart by prefix."""
    with moto_s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance shared by every test of the session that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield
    ray.shutdown()
