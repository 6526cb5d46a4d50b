"""The operator's commands: ``metaserve serve``, ``dispatcher``, ``db upgrade|downgrade|check``
and ``keys create|list|revoke|rotate``. They run on the server's host, read its settings
(``METASERVE_*``) and open its database directly; none of them talks HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from metaserve.cli.common import fail, printable
from metaserve.service.exceptions import KeyNotFound
from metaserve.service.settings import Settings, get_settings

def _old_url_name(value: Optional[str]) -> Optional[str]:
    """Say that ``--url`` (of ``db`` and ``keys``) is now ``--database-url``."""
    import sys

    if any(arg == "--url" or arg.startswith("--url=") for arg in sys.argv[1:]):
        typer.echo("note: --url is deprecated here; it is --database-url", err=True)
    return value


DatabaseUrl = Annotated[Optional[str], typer.Option(
    "--database-url", "--url", help="Database URL (default: METASERVE_DATABASE_URL); --url is "
    "its old name, deprecated: `metaserve login --url` names the server, not the database.",
    callback=_old_url_name)]


db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)


def _valid_settings() -> "Settings":
    """The settings; a bad one is one line on stderr and exit code 1."""
    from pydantic import ValidationError

    try:
        return get_settings()
    except ValidationError as error:
        first = error.errors()[0]
        field = "METASERVE_" + "_".join(str(part) for part in first["loc"]).upper()
        message = first["msg"].removeprefix("Value error, ")
        raise fail(message if "METASERVE_" in message else f"{field}: {message}") from None


def _settings_with_working_store() -> "Settings":
    """The settings, once the artifact store answered; otherwise one line on stderr and exit
    code 1 (a bad setting, wrong credentials, an unreachable endpoint, a missing bucket)."""
    from metaserve.workers.object_store import StorageError, open_store

    settings = _valid_settings()
    try:
        open_store(settings.storage_config()).check()
    except (StorageError, ValueError) as error:
        raise fail(f"cannot start: {error}") from None
    return settings


def private_state(settings: "Settings") -> None:
    """Files the server writes are its user's only: umask 077 for everything created from
    here on (SQLite file and its -wal/-shm, admin.key, artifacts, checkpoints), and the
    existing state tightened: directories 0700, files of the data directory 0600."""
    import os

    from sqlalchemy.engine import make_url

    os.umask(0o077)
    directories = [Path(settings.data_dir)]
    if "://" not in settings.artifact_root:
        directories.append(Path(settings.artifact_root))
    url = make_url(settings.database_url)
    database = (Path(url.database) if url.get_backend_name() == "sqlite" and url.database
                and url.database != ":memory:" else None)
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
    files = [path for path in Path(settings.data_dir).iterdir() if path.is_file()]
    if database is not None:
        files += [database.with_name(database.name + suffix) for suffix in ("", "-wal", "-shm")]
    for path in files:
        if path.exists():
            path.chmod(0o600)


FILE_DESCRIPTOR_RESERVE = 100
"""Descriptors kept free of client connections: the database pool, Ray, log and artifact files."""


def connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to leave :data:`FILE_DESCRIPTOR_RESERVE` of this process's
    file-descriptor limit free: a server out of descriptors answers nobody, ``/healthz``
    included."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(2, min(max_connections, soft - FILE_DESCRIPTOR_RESERVE))


def _require_free_port(host: str, port: int) -> None:
    """Exit 2 with one line naming the setting to change when ``host:port`` cannot be bound
    (uvicorn would print a multi-line traceback and exit 3)."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        typer.echo(f"error: cannot serve on host {printable(host)!r}: {error.strerror}; set "
                   "METASERVE_HOST (or --host) to an address of this machine", err=True)
        raise typer.Exit(2) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                said = (f"port {port} on {host} is taken (another metaserve serve?); set "
                        "METASERVE_PORT (or --port) to a free port")
            else:
                said = (f"cannot listen on {host}:{port}: {error.strerror}; set METASERVE_HOST "
                        "and METASERVE_PORT (or --host, --port) to an address this user may bind")
            typer.echo(f"error: {printable(said)}", err=True)
            raise typer.Exit(2) from None


def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (default: METASERVE_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default: METASERVE_PORT).")] = None,
    no_dispatcher: Annotated[bool, typer.Option("--no-dispatcher",
                                                help="Serve the API only; run no jobs.")] = False,
) -> None:
    """Migrate the database, create the first admin key if there is none, and serve the API."""
    import logging

    import uvicorn

    from metaserve.api.app import create_app
    from metaserve.service import auth, migrate
    from metaserve.service.db import make_engine, session_factory

    settings = _settings_with_working_store()
    updates = {key: value for key, value in
               {"host": host, "port": port, "dispatcher": False if no_dispatcher else None}.items()
               if value is not None}
    settings = settings.model_copy(update=updates)
    _require_free_port(settings.host, settings.port)  # before migrating: fail at once
    private_state(settings)
    with _database_errors(settings.database_url):  # unreachable: one line naming it
        migrate.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with session_factory(engine)() as session:
            written = auth.ensure_admin_key(session=session, path=settings.admin_key_path)
    finally:
        engine.dispose()
    if written is not None:
        typer.echo(f"created an admin API key; it is in {written.resolve()}")
    from metaserve.api.http_protocol import limited_http_protocol

    # The server's own records (the embedded dispatcher's claims, drains, handbacks) beside
    # uvicorn's, as `metaserve dispatcher` writes them.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(settings, freeze_gc=True)
    protocol = limited_http_protocol(
        max_header_bytes=settings.max_header_bytes, max_url_bytes=settings.max_url_bytes,
        header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
        body_min_bytes_per_s=settings.body_min_bytes_per_s,
        max_connections=connection_cap(settings.max_connections),
        max_connections_per_client=settings.max_connections_per_client,
        auth_failures=app.state.auth_failures)
    uvicorn.run(app, host=settings.host, port=settings.port, http=protocol)


def dispatcher(
    concurrency: Annotated[Optional[int], typer.Option(
        help="Jobs run at once (default: METASERVE_DISPATCHER_CONCURRENCY).")] = None,
    health: Annotated[bool, typer.Option(
        "--health", help="Exit 0 when the dispatcher of this host is connected to Ray and the "
        "database and renewing leases (its last report is fresh), else 1 with the reason; "
        "for container health checks.")] = False,
) -> None:
    """Run a standalone dispatcher: claim queued jobs and run them on the Ray cluster at
    METASERVE_RAY_ADDRESS. Any number may run against one database. SIGTERM drains it: no
    more claims, its running jobs are handed back (resumed elsewhere from their last
    checkpoint, the attempt not counted) and it exits within METASERVE_DRAIN_GRACE_S."""
    import logging

    from metaserve.service.dispatcher import Dispatcher, dispatcher_healthy

    if health:
        settings = _valid_settings()
        healthy, reason = dispatcher_healthy(settings.dispatcher_health_path,
                                             max_age_s=settings.lease_s)
        typer.echo(reason, err=not healthy)
        raise typer.Exit(0 if healthy else 1)

    from metaserve.service import migrate
    from metaserve.service.db import engine_timeouts, make_engine, session_factory

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = _settings_with_working_store()
    if concurrency is not None:
        settings = settings.model_copy(update={"dispatcher_concurrency": concurrency})
    with _database_errors(settings.database_url):  # unreachable: one line naming it
        migrate.upgrade(settings.database_url)
    engine = make_engine(settings.database_url, **engine_timeouts(settings, dispatcher=True))
    try:
        Dispatcher(settings, session_factory(engine),
                   health_path=settings.dispatcher_health_path).run_forever()
    finally:
        engine.dispose()


@db_app.command("upgrade")
def db_upgrade(revision: str = "head",
               url: DatabaseUrl = None) -> None:
    """Apply migrations up to REVISION (default head)."""
    from metaserve.service import migrate

    with _database_errors(url or _valid_settings().database_url):
        migrate.upgrade(url, revision)


@db_app.command("downgrade")
def db_downgrade(revision: str = "base",
                 url: DatabaseUrl = None) -> None:
    """Revert migrations down to REVISION (default base: an empty schema)."""
    from metaserve.service import migrate

    with _database_errors(url := _existing_database(url)):
        migrate.downgrade(url, revision)


@db_app.command("check")
def db_check(url: DatabaseUrl = None) -> None:
    """Fail if the table models differ from the migrated schema."""
    from alembic.util.exc import AutogenerateDiffsDetected

    from metaserve.service import migrate

    try:
        with _database_errors(url := _existing_database(url)):
            migrate.check(url)
    except AutogenerateDiffsDetected as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    """A database that cannot be reached or read, or an Alembic refusal, is one line on
    stderr naming the database, exit 1."""
    from alembic.util.exc import AutogenerateDiffsDetected, CommandError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except AutogenerateDiffsDetected:
        raise  # `db check`'s finding: the differences, listed by the caller
    except (SQLAlchemyError, CommandError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise fail(f"database {_shown(url)}: {reason}") from None


WRONG_DIRECTORY_HINT = ("run this in the directory where `metaserve serve` runs, or set "
                        "METASERVE_DATABASE_URL or --database-url")


def _existing_database(url: Optional[str]) -> str:
    """The database URL (``--database-url``, else METASERVE_DATABASE_URL); a SQLite file that does not
    exist is one line naming the file looked for, never a new empty database."""
    from sqlalchemy.engine import make_url

    url = url or _valid_settings().database_url
    parsed = make_url(url)
    if (parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
            and not Path(parsed.database).is_file()):
        raise fail(f"no metaserve database at {_shown(url)} "
                    f"({Path(parsed.database).resolve()} does not exist): {WRONG_DIRECTORY_HINT}")
    return url


def _key_sessions(url: Optional[str]):  # noqa: ANN202
    """The engine of the server's database, once it is found to be one: run in the wrong
    directory, an admin command names the database it looked for instead of creating one."""
    from sqlalchemy import inspect

    from metaserve.service.db import make_engine, session_factory

    url = _existing_database(url)
    hint = WRONG_DIRECTORY_HINT
    engine = make_engine(url)
    try:
        with _database_errors(url), engine.connect() as connection:
            migrated = inspect(connection).has_table("users")
    except typer.Exit:
        engine.dispose()
        raise
    if not migrated:
        engine.dispose()
        raise fail(f"{_shown(url)} is not a metaserve database (it has no users table): {hint}")
    return engine, session_factory


@keys_app.command("create")
def keys_create(
    name: str,
    admin: Annotated[bool, typer.Option("--admin", help="May see every user's jobs.")] = False,
    url: DatabaseUrl = None,
) -> None:
    """Create an API key for NAME and print it once (only its hash is stored)."""
    from metaserve.service import auth

    engine, factory = _key_sessions(url)
    try:
        with factory(engine)() as session:
            _, key = auth.create_key(session=session, name=name, is_admin=admin)
    finally:
        engine.dispose()
    typer.echo(key)


@keys_app.command("list")
def keys_list(url: DatabaseUrl = None) -> None:
    """Every API key: id, name, admin, revoked, created (never the key: only its hash is stored)."""
    from metaserve.service import auth

    engine, factory = _key_sessions(url)
    try:
        with factory(engine)() as session:
            users = auth.list_keys(session=session)
    finally:
        engine.dispose()
    typer.echo(f"{'id':>5}  {'name':<24} {'admin':<6} {'revoked':<8} created")
    for user in users:
        typer.echo(f"{user.id:>5}  {printable(user.name):<24} {'yes' if user.is_admin else 'no':<6} "
                   f"{'yes' if auth.is_revoked(user) else 'no':<8} "
                   f"{user.created_at:%Y-%m-%d %H:%M:%S}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(metavar="ID", help="As `keys list` shows.")],
                url: DatabaseUrl = None) -> None:
    """Revoke a key: refused at once by a server that has not seen it lately, within 5 minutes
    (its key cache) by one that has; the user's jobs stay."""
    from metaserve.service import auth

    engine, factory = _key_sessions(url)
    try:
        with factory(engine)() as session:
            user = auth.revoke_key(session=session, user_id=key_id)
    except KeyNotFound as error:
        raise fail(error.message) from None
    finally:
        engine.dispose()
    typer.echo(f"revoked key {user.id} ({printable(user.name)})")


@keys_app.command("rotate")
def keys_rotate(key_id: Annotated[int, typer.Argument(metavar="ID", help="As `keys list` shows.")],
                url: DatabaseUrl = None) -> None:
    """Give key ID's user a new key and print it once; the old one ends as a revoked one does."""
    from metaserve.service import auth

    engine, factory = _key_sessions(url)
    try:
        with factory(engine)() as session:
            _, key = auth.rotate_key(session=session, user_id=key_id)
    except KeyNotFound as error:
        raise fail(error.message) from None
    finally:
        engine.dispose()
    typer.echo(key)
