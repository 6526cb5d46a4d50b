"""The ``metaserve`` command: ``serve``, ``dispatcher``, ``db upgrade|downgrade|check``, ``keys create``, ``train``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import Enum
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from metaserve.service.settings import Settings, get_settings



class _OneLineErrors(typer.Typer):
    """The ``metaserve`` command: a usage error (unknown option, missing argument, bad value)
    is one line on stderr and exit code 1, like every other user error, instead of click's
    boxed usage text and exit code 2. ``metaserve`` alone prints the help and exits 0."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        import sys

        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:  # click's usage errors (typer vendors click)
            context = getattr(error, "ctx", None)
            if type(error).__name__ == "NoArgsIsHelpError" and context is not None:
                typer.echo(context.get_help())
                sys.exit(0)
            hint = f" (see {context.command_path} --help)" if context is not None else ""
            message = error.format_message() if hasattr(error, "format_message") else str(error)
            typer.echo(f"error: {printable(message)}{hint}", err=True)
            sys.exit(1)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = _OneLineErrors(help="metaserve: meta-learning jobs over REST, run on Ray.",
                     no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
datasets_app = typer.Typer(help="Your uploaded datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    """``value`` as text with every control character (C0, DEL, C1: ESC, CSI, BEL, CR, ...)
    written as its escape (``\\x1b``), so server-supplied text cannot drive the terminal."""
    return CONTROL_CHARACTERS.sub(lambda found: found.group().encode("unicode_escape").decode(),
                                  str(value))


def _valid_settings() -> "Settings":
    """The settings; a bad one is one line on stderr and exit code 1."""
    from pydantic import ValidationError

    try:
        return get_settings()
    except ValidationError as error:
        first = error.errors()[0]
        field = "METASERVE_" + "_".join(str(part) for part in first["loc"]).upper()
        message = first["msg"].removeprefix("Value error, ")
        raise _fail(message if "METASERVE_" in message else f"{field}: {message}") from None


def _settings_with_working_store() -> "Settings":
    """The settings, once the artifact store answered; otherwise one line on stderr and exit
    code 1 (a bad setting, wrong credentials, an unreachable endpoint, a missing bucket)."""
    from metaserve.workers.object_store import StorageError, open_store

    settings = _valid_settings()
    try:
        open_store(settings.storage_config()).check()
    except (StorageError, ValueError) as error:
        raise _fail(f"cannot start: {error}") from None
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


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (default: METASERVE_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default: METASERVE_PORT).")] = None,
    no_dispatcher: Annotated[bool, typer.Option("--no-dispatcher",
                                                help="Serve the API only; run no jobs.")] = False,
) -> None:
    """Migrate the database, create the first admin key if there is none, and serve the API."""
    import uvicorn

    from metaserve.api.app import create_app
    from metaserve.service import auth, migrate
    from metaserve.service.db import make_engine, session_factory

    settings = _settings_with_working_store()
    updates = {key: value for key, value in
               {"host": host, "port": port, "dispatcher": False if no_dispatcher else None}.items()
               if value is not None}
    settings = settings.model_copy(update=updates)
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
    from metaserve.api.middleware import limited_http_protocol

    protocol = limited_http_protocol(max_header_bytes=settings.max_header_bytes,
                                     max_url_bytes=settings.max_url_bytes,
                                     header_timeout_s=settings.header_timeout_s)
    uvicorn.run(create_app(settings, freeze_gc=True), host=settings.host, port=settings.port,
                http=protocol)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head",
               url: Annotated[Optional[str], typer.Option(help="Database URL.")] = None) -> None:
    """Apply migrations up to REVISION (default head)."""
    from metaserve.service import migrate

    with _database_errors(url or _valid_settings().database_url):
        migrate.upgrade(url, revision)


@db_app.command("downgrade")
def db_downgrade(revision: str = "base",
                 url: Annotated[Optional[str], typer.Option(help="Database URL.")] = None) -> None:
    """Revert migrations down to REVISION (default base: an empty schema)."""
    from metaserve.service import migrate

    with _database_errors(url := _existing_database(url)):
        migrate.downgrade(url, revision)


@db_app.command("check")
def db_check(url: Annotated[Optional[str], typer.Option(help="Database URL.")] = None) -> None:
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
        raise _fail(f"database {_shown(url)}: {reason}") from None


WRONG_DIRECTORY_HINT = ("run this in the directory where `metaserve serve` runs, or set "
                        "METASERVE_DATABASE_URL or --url")


def _existing_database(url: Optional[str]) -> str:
    """The database URL (``--url``, else METASERVE_DATABASE_URL); a SQLite file that does not
    exist is one line naming the file looked for, never a new empty database."""
    from sqlalchemy.engine import make_url

    url = url or _valid_settings().database_url
    parsed = make_url(url)
    if (parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
            and not Path(parsed.database).is_file()):
        raise _fail(f"no metaserve database at {_shown(url)} "
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
        raise _fail(f"{_shown(url)} is not a metaserve database (it has no users table): {hint}")
    return engine, session_factory


@keys_app.command("create")
def keys_create(
    name: str,
    admin: Annotated[bool, typer.Option("--admin", help="May see every user's jobs.")] = False,
    url: Annotated[Optional[str], typer.Option(help="Database URL.")] = None,
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
def keys_list(url: Annotated[Optional[str], typer.Option(help="Database URL.")] = None) -> None:
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
                url: Annotated[Optional[str], typer.Option(help="Database URL.")] = None) -> None:
    """Revoke a key: refused at once by a server that has not seen it lately, within 5 minutes
    (its key cache) by one that has; the user's jobs stay."""
    from metaserve.service import auth

    engine, factory = _key_sessions(url)
    try:
        with factory(engine)() as session:
            user = auth.revoke_key(session=session, user_id=key_id)
    except auth.KeyNotFound as error:
        raise _fail(error.message) from None
    finally:
        engine.dispose()
    typer.echo(f"revoked key {user.id} ({printable(user.name)})")


@keys_app.command("rotate")
def keys_rotate(key_id: Annotated[int, typer.Argument(metavar="ID", help="As `keys list` shows.")],
                url: Annotated[Optional[str], typer.Option(help="Database URL.")] = None) -> None:
    """Give key ID's user a new key and print it once; the old one ends as a revoked one does."""
    from metaserve.service import auth

    engine, factory = _key_sessions(url)
    try:
        with factory(engine)() as session:
            _, key = auth.rotate_key(session=session, user_id=key_id)
    except auth.KeyNotFound as error:
        raise _fail(error.message) from None
    finally:
        engine.dispose()
    typer.echo(key)


@app.command(context_settings={"allow_extra_args": False})
def train(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("runs/job"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override: key.path=value.")] = None,
) -> None:
    """Run a job in-process, without the server (the engine of workers/)."""
    from pydantic import ValidationError

    from metaserve.service.sdk import load_spec_document
    from metaserve.workers.cli import train as run_training
    from metaserve.workers.spec import JobSpec

    with _ClientErrors():  # unreadable file, invalid YAML, a bad --set: one line each
        document = load_spec_document(spec, set_ or [])
    try:
        JobSpec.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in found['loc']) or 'spec'}: "
                             f"{found['msg']}" for found in error.errors())
        raise _fail(f"invalid job spec {spec}: {problems}") from None
    run_training(spec=spec, out=out, set_=set_ or [])


@app.command()
def dispatcher(
    concurrency: Annotated[Optional[int], typer.Option(
        help="Jobs run at once (default: METASERVE_DISPATCHER_CONCURRENCY).")] = None,
    health: Annotated[bool, typer.Option(
        "--health", help="Exit 0 when the dispatcher of this host is connected to Ray and the "
        "database and renewing leases (its last report is fresh), else 1 with the reason; "
        "for container health checks.")] = False,
) -> None:
    """Run a standalone dispatcher: claim queued jobs and run them on the Ray cluster at
    METASERVE_RAY_ADDRESS. Any number may run against one database."""
    import logging

    from metaserve.service.dispatcher import Dispatcher, dispatcher_healthy

    if health:
        settings = _valid_settings()
        healthy, reason = dispatcher_healthy(settings.dispatcher_health_path,
                                             max_age_s=settings.lease_s)
        typer.echo(reason, err=not healthy)
        raise typer.Exit(0 if healthy else 1)

    from metaserve.service import migrate
    from metaserve.service.db import make_engine, session_factory

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = _settings_with_working_store()
    if concurrency is not None:
        settings = settings.model_copy(update={"dispatcher_concurrency": concurrency})
    with _database_errors(settings.database_url):  # unreachable: one line naming it
        migrate.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        Dispatcher(settings, session_factory(engine),
                   health_path=settings.dispatcher_health_path).run_forever()
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- HTTP client commands
#
# These talk to a server through :mod:`metaserve.service.sdk`. An error is one line on stderr and exit
# code 1, never a traceback.

JobArgument = Annotated[str, typer.Argument(help="Job id (as printed by submit or list).", metavar="JOB")]


def _fail(message: str) -> typer.Exit:
    first, *more = message.split("\n")
    typer.echo("\n".join([f"error: {printable(first)}", *(printable(line) for line in more)]),
               err=True)
    return typer.Exit(1)


class _ClientErrors:
    """Turns SDK errors (and a missing file) into one line on stderr and exit code 1."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        from metaserve.service.sdk import MetaserveClientError

        if exc is None or isinstance(exc, (typer.Exit, typer.Abort)):
            return False
        if isinstance(exc, MetaserveClientError):
            # A 422 names each bad field: one line each, under the message.
            details = (getattr(exc, "details", None) or []
                       if getattr(exc, "status_code", None) == 422 else [])
            lines = [str(exc)] + [f"  {detail.get('field') or 'request'}: {detail.get('message')}"
                                  for detail in details if isinstance(detail, dict)]
            raise _fail("\n".join(lines)) from None
        if isinstance(exc, OSError):
            raise _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from None
        return False


def _client(url: Optional[str] = None, api_key: Optional[str] = None):  # noqa: ANN202
    from metaserve.service.sdk import Client

    return Client(url=url, api_key=api_key)


@app.command()
def login(
    url: Annotated[Optional[str], typer.Option(help="Server URL (default: METASERVE_URL, "
                                               "else http://127.0.0.1:8000).")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="API key (default: METASERVE_API_KEY, "
                                                   "else asked for).")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="Read the API key from this file "
                                                         "(e.g. .metaserve/admin.key).")] = None,
) -> None:
    """Check the URL and API key against the server and save them in the config file."""
    import os

    from metaserve.service import sdk

    with _ClientErrors():
        url = url or os.environ.get("METASERVE_URL") or sdk.DEFAULT_URL
        if api_key_file is not None:
            api_key = api_key_file.read_text().strip()
        api_key = api_key or os.environ.get("METASERVE_API_KEY") or typer.prompt(
            "API key", hide_input=True)
        with sdk.Client(url=url, api_key=api_key) as client:
            client.list(limit=1)
        path = sdk.write_config(url=url, api_key=api_key)
    typer.echo(f"logged in to {url}; saved in {path}")


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override: key.path=value.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job with a progress bar until "
                                       "it finishes; exit 1 unless it succeeds.")] = False,
    idempotency_key: Annotated[Optional[str], typer.Option(help="Makes a retried submit safe.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the job id, for "
                                        "JOB=$(metaserve submit -q ...); with --wait, once the "
                                        "job succeeded and without a progress bar.")] = False,
) -> None:
    """Submit a job; prints its id (and, with --wait, follows it to the end)."""
    with _ClientErrors(), _client() as client:
        job = client.submit(spec, overrides=set_ or [], idempotency_key=idempotency_key)
        if not quiet:
            typer.echo(printable(f"submitted {job['id']} ({job['name']})"))
        if wait:
            _follow(client, job, quiet=quiet)
        elif quiet:
            typer.echo(printable(job["id"]))


def _follow(client, job: dict, *, quiet: bool = False) -> None:  # noqa: ANN001
    try:
        final = client.wait(job, progress=not quiet)
    except KeyboardInterrupt:
        job_id = printable(job["id"])
        typer.echo(f"\nstopped following {job_id}; the job goes on. Re-attach with: "
                   f"metaserve wait {job_id}   (its log: metaserve logs -f {job_id}; "
                   f"cancel it: metaserve cancel {job_id})", err=True)
        raise typer.Exit(130) from None
    line = f"{final['id']} {final['status']}"
    if final["status"] != "succeeded":
        raise _fail(f"{line}: {final['error'] or final['message'] or ''}".rstrip(": "))
    typer.echo(printable(final["id"] if quiet else line))


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


OutputOption = Annotated[OutputFormat, typer.Option(
    "--output", "-o", help="table (for people) or json (the API's objects, for scripts).")]


def _print_json(value: object) -> None:
    import json

    typer.echo(json.dumps(value, indent=2, sort_keys=True))


@app.command("list")
def list_command(
    status: Annotated[Optional[str], typer.Option(help="Only jobs in this status.")] = None,
    name: Annotated[Optional[str], typer.Option(
        help="Only jobs whose name contains this, in any case.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many jobs.", min=1)] = 20,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Your jobs, newest first, as a table (or --output json)."""
    from rich.console import Console

    with _ClientErrors(), _client() as client:
        found = client.list(status=status, limit=limit, name=name)
    if output is OutputFormat.json:
        _print_json(found)
        return
    console = Console()
    console.print(jobs_table(found, console.width))


def jobs_table(found: list[dict], width: int):  # noqa: ANN201 - a rich Table
    """The jobs as a table that reads in ``width`` columns (80: names up to 19 characters
    whole): every column but the name at its full width (a status, an id are never cut), the
    name cut with an ellipsis to what is left."""
    from datetime import datetime, timezone

    from rich import box
    from rich.table import Table
    from rich.text import Text

    now = datetime.now(timezone.utc)
    rows = []
    for job in found:
        progress = job.get("progress") or {}
        done = f"{progress['iteration']}/{progress['total']}" if "iteration" in progress else "-"
        rows.append([printable(cell) for cell in (
            job["name"], job["status"], done, job["attempt"], _age(job["created_at"], now),
            job["id"])])
    columns = (("status", "left"), ("progress", "right"), ("try", "right"), ("age", "right"),
               ("id", "left"))
    widths = [max([len(header), *(len(row[index]) for row in rows)])
              for index, (header, _) in enumerate(columns, start=1)]
    gap = 2  # one space of padding, one of the (blank) column divider
    names = max([4, *(len(row[0]) for row in rows)])
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0))
    table.add_column("name", overflow="ellipsis", no_wrap=True,
                     width=max(12, min(names, width - sum(widths) - gap * len(widths) - 1)))
    for (header, justify), column_width in zip(columns, widths):
        table.add_column(header, no_wrap=True, justify=justify,  # type: ignore[arg-type]
                         width=column_width)
    for row in rows:  # Text, not str: no rich markup in a server-supplied name
        table.add_row(*(Text(cell) for cell in row))
    return table


def _age(created_at: str, now) -> str:  # noqa: ANN001
    """``45s``, ``12m``, ``5h``, ``3d`` (``kubectl get``'s AGE)."""
    from datetime import datetime, timezone

    try:
        created = datetime.fromisoformat(str(created_at).replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    seconds = max(0, int((now - created).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@app.command()
def status(job: JobArgument, output: OutputOption = OutputFormat.table) -> None:
    """One job: status, attempt, progress, message and error (or --output json)."""
    with _ClientErrors(), _client() as client:
        found = client.get(job)
    if output is OutputFormat.json:
        _print_json(found)
        return
    progress = found.get("progress") or {}
    lines = [("id", found["id"]), ("name", found["name"]), ("status", found["status"]),
             ("attempt", f"{found['attempt']} of {found['max_attempts']}")]
    if "iteration" in progress:
        lines.append(("progress", f"{progress['iteration']}/{progress.get('total')} iterations, "
                                  f"{progress.get('tasks_per_s')} tasks/s"))
    lines += [(key, found[key]) for key in ("message", "error", "created_at", "started_at",
                                            "finished_at") if found.get(key)]
    for key, value in lines:
        typer.echo(f"{key + ':':<13}{printable(value)}")


@app.command()
def metrics(
    job: JobArgument,
    plot: Annotated[Optional[Path], typer.Option(help="Write a figure of the loss and "
                                                 "evaluation curves (PNG, SVG, PDF).")] = None,
) -> None:
    """The latest value of each metric series; --plot draws every series over the steps."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    with _ClientErrors(), _client() as client:
        points = client.metrics(job)
        if not points:
            raise _fail(f"job {job} has no metrics yet")
        series: dict[str, list[tuple[int, float | None]]] = {}
        for point in points:
            series.setdefault(point["name"], []).append((point["step"], point["value"]))
        table = Table("metric", "step", "value")
        for name in sorted(series):
            step, value = series[name][-1]
            table.add_row(Text(printable(name)), str(step),
                          "-" if value is None else f"{value:.4g}")
        Console().print(table)
        if plot is not None:
            plot_metrics(series, plot, title=f"job {job}")
            typer.echo(f"wrote {plot}")


COUNTER = re.compile(r"(^|/)(tasks|env_steps|steps|episodes|line_search_steps|workers)$"
                     r"|_per_s(econd)?$")
"""Series that count or rate work (tasks, env steps, throughput): never plotted as curves."""

PANELS = (("train_loss", "meta-training loss", "loss"),
          ("eval_loss", "evaluation loss / MSE (held-out tasks)", "loss"),
          ("accuracy", "evaluation accuracy (held-out tasks)", "accuracy"),
          ("returns", "returns (RL)", "return"),
          ("train_other", "meta-training: other", "value"))


def metric_panel(name: str) -> str | None:
    """Which panel of :func:`plot_metrics` a series goes on (None: not plotted): loss,
    accuracy and returns never share an axis."""
    if name.endswith("_ci95") or COUNTER.search(name):
        return None
    split, _, measure = name.rpartition("/")
    if "return" in measure:
        return "returns"
    if "accuracy" in measure:
        return "accuracy"
    if "loss" in measure or "mse" in measure:
        return "train_loss" if split == "train" else "eval_loss"
    return "train_other" if split == "train" else None


def plot_metrics(series: dict[str, list[tuple[int, float | None]]], path: Path, title: str) -> None:
    """One panel per kind of quantity (:data:`PANELS`): training loss, evaluation loss or MSE
    and accuracy (after k adaptation steps, with 95% intervals), RL returns; counters and
    rates are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped: dict[str, list[str]] = {}
    for name in sorted(series):
        panel = metric_panel(name)
        if panel is not None and any(value is not None for _, value in series[name]):
            grouped.setdefault(panel, []).append(name)
    panels = [panel for panel in PANELS if panel[0] in grouped] or [PANELS[0]]
    figure, axes_list = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2),
                                     squeeze=False)
    for axes, (panel, heading, unit) in zip(axes_list[0], panels):
        for name in grouped.get(panel, []):
            steps = [step for step, value in series[name] if value is not None]
            ys = [value for _, value in series[name] if value is not None]
            interval = dict(series.get(f"{name}_ci95", []))
            if interval:
                errors = [interval.get(step) or 0.0 for step in steps]
                axes.errorbar(steps, ys, yerr=errors, marker="o", capsize=3, label=name)
            else:
                axes.plot(steps, ys, label=name)
        axes.set_title(heading)
        axes.set_xlabel("meta-iteration")
        axes.set_ylabel(unit)
        if axes.has_data():
            axes.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


@app.command()
def wait(
    job: JobArgument,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; print only "
                                        "the id once the job succeeded.")] = False,
) -> None:
    """Follow a job (again) with a progress bar until it ends; exit 0 if it succeeded, else
    1 with its error. Ctrl-C stops following, not the job."""
    with _ClientErrors(), _client() as client:
        _follow(client, client.get(job), quiet=quiet)


def format_log_record(record: dict) -> str:
    """``HH:MM:SS LEVEL source: message`` (a traceback's lines follow, indented as sent)."""
    stamp = str(record.get("time", ""))[11:19]
    return (f"{stamp} {str(record.get('level', '')):<7} {record.get('source', '')}: "
            f"{record.get('message', '')}")


@app.command()
def logs(
    job: JobArgument,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new records "
                                         "until the job ends.")] = False,
) -> None:
    """The job's log: its driver's and inner-loop workers' records and tracebacks, and the
    dispatcher's lines about its attempts."""
    with _ClientErrors(), _client() as client:
        records = client.follow_logs(job) if follow else client.logs(job)
        try:
            for record in records:
                # printable per line: a traceback keeps its lines, control characters escaped
                typer.echo("\n".join(printable(line)
                                      for line in format_log_record(record).split("\n")))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


@app.command()
def cancel(job: JobArgument) -> None:
    """Cancel a job: a queued one at once, a running one as soon as its runner stops."""
    with _ClientErrors(), _client() as client:
        found = client.cancel(job)
    typer.echo(printable(f"{found['id']} {found['status']}"))


@app.command()
def fetch(
    job: JobArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to download into.")],
    all_: Annotated[bool, typer.Option("--all", help="Every artifact, checkpoints included.")] = False,
) -> None:
    """Download the job's final artifacts: its meta-initialization (meta_init.*) or, for a
    meta-RL job, its meta-policy (meta_policy.*); says which and how to load it."""
    from metaserve.service import sdk

    with _ClientErrors(), _client() as client:
        names = None if all_ else tuple(client.final_artifacts(job))
        if names == ():
            status = printable(client.get(job)["status"])
            raise _fail(f"job {printable(job)} has no final artifacts yet (status: {status})")
        directory = client.download(job, out, names=names)
    listed = set(names) if names is not None else {path.name for path in Path(out).iterdir()}
    kinds = [kind for kind, files in sdk.ARTIFACT_FILES.items() if set(files) <= listed]
    loads = f"; load it with Client().{sdk.LOADERS[kinds[0]]}({str(directory)!r})" if kinds else ""
    typer.echo(f"downloaded {printable(', '.join(names or ('every artifact',)))} to "
               f"{printable(str(directory))}{printable(loads)}")


# --------------------------------------------------------------------------- datasets


def _dataset_line(dataset: dict) -> str:
    shape = "×".join(str(n) for n in dataset["shape"])
    return (f"{dataset['id']}  {dataset['name']}  {dataset['format']}  {dataset['classes']} classes"
            f"  {dataset['images']} images of {shape}  {dataset['bytes']:,} bytes")


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(help="An .npz (images, labels) or a .zip/.tar of an "
                                         "ImageFolder or Omniglot tree.")],
    name: Annotated[Optional[str], typer.Option(help="Default: the file name.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Upload a dataset; prints its id (name it in a spec as task_family.dataset)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with _ClientErrors(), _client() as client:
        bar = Progress("[bold]upload", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       disable=not progress)
        with bar:
            task = bar.add_task("upload", total=path.stat().st_size)
            dataset = client.upload_dataset(
                path, name=name, progress=lambda sent, total: bar.update(task, completed=sent))
    typer.echo(printable(_dataset_line(dataset)))


@datasets_app.command("list")
def datasets_list() -> None:
    """Your datasets, newest first."""
    with _ClientErrors(), _client() as client:
        for dataset in client.datasets():
            typer.echo(printable(_dataset_line(dataset)))


@datasets_app.command("show")
def datasets_show(dataset_id: Annotated[str, typer.Argument(metavar="DATASET")]) -> None:
    """One dataset, as JSON."""
    import json

    with _ClientErrors(), _client() as client:
        document = client.dataset(dataset_id)
    for line in json.dumps(document, indent=2, ensure_ascii=False).splitlines():
        typer.echo(printable(line))


@datasets_app.command("delete")
def datasets_delete(dataset_id: Annotated[str, typer.Argument(metavar="DATASET")]) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    with _ClientErrors(), _client() as client:
        client.delete_dataset(dataset_id)
    typer.echo(printable(f"deleted {dataset_id}"))


from metaserve.service.sweep_cli import sweep_app  # noqa: E402 - registers `metaserve sweep`

app.add_typer(sweep_app, name="sweep")
