"""Engines and sessions. SQLite gets WAL, a busy timeout and foreign keys on every connection."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 10_000
# Connections kept open to a server database: as many as the request threadpool (anyio's 40)
# may use at once, so a burst never pays for new backend processes (overflow connections are
# closed again on return).
POOL_SIZE = 40
# A SQLite file takes one writer at a time, and a writer that finds it locked sleeps in
# SQLite's busy handler (1, 2, 5, ... 100 ms steps), which with dozens of threads makes a long,
# unfair tail. A few pooled connections (no overflow) make the threads queue in the pool
# instead, first come first served: 50 clients submitting back to back got p99 0.47 s instead
# of 1.2 s, and more submits/s (docs/RELIABILITY.md, "Load").
SQLITE_POOL_SIZE = 4


def _configure_sqlite(dbapi_connection, _record) -> None:  # noqa: ANN001
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
    # SQLite's lower() folds ASCII only; PostgreSQL's folds every letter (name search)
    dbapi_connection.create_function(UNICODE_LOWER, 1, _lower, deterministic=True)


UNICODE_LOWER = "metaserve_lower"


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


# PostgreSQL: a new connection waits at most this long (psycopg's connect_timeout: without it
# an unreachable server hangs a connect for the kernel's TCP timeout, minutes). The server's
# and dispatcher's engines also bound each statement (METASERVE_DB_STATEMENT_TIMEOUT_S), the
# dispatcher's a transaction left idle (see engine_timeouts); other engines (migrations,
# benchmarks) do not.
CONNECT_TIMEOUT_S = 10
STATEMENT_TIMEOUT_S = 0.0


def engine_timeouts(settings, *, dispatcher: bool = False) -> dict[str, float]:  # noqa: ANN001
    """:func:`make_engine`'s timeouts from the settings (METASERVE_DB_*_TIMEOUT_S); a
    ``dispatcher``'s engine also ends a connection left idle inside a transaction (by default
    after the lease length): a dispatcher paused mid-write must not keep its jobs' rows locked
    past their leases, or no other dispatcher could take them over (the reclaim skips locked
    rows)."""
    timeouts = {"connect_timeout_s": settings.db_connect_timeout_s,
                "statement_timeout_s": settings.db_statement_timeout_s}
    if dispatcher:
        idle = settings.db_idle_in_transaction_timeout_s
        timeouts["idle_in_transaction_timeout_s"] = settings.lease_s if idle is None else idle
    return timeouts


def make_engine(url: str, *, connect_timeout_s: int = CONNECT_TIMEOUT_S,
                statement_timeout_s: float = STATEMENT_TIMEOUT_S,
                idle_in_transaction_timeout_s: float = 0.0, **kwargs) -> Engine:  # noqa: ANN003
    """An engine for ``url``; for a SQLite file, its directory is created first. PostgreSQL
    connections get ``connect_timeout_s``, ``statement_timeout_s`` and
    ``idle_in_transaction_timeout_s`` (0: no limit)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs.setdefault("pool_size", SQLITE_POOL_SIZE)
            kwargs.setdefault("max_overflow", 0)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    connect_args = dict(kwargs.pop("connect_args", {}))
    if parsed.get_backend_name() == "postgresql":
        connect_args.setdefault("connect_timeout", int(connect_timeout_s))
        options = [f"-c {name}={int(seconds * 1000)}" for name, seconds in (
            ("statement_timeout", statement_timeout_s),
            ("idle_in_transaction_session_timeout", idle_in_transaction_timeout_s)) if seconds]
        if options:
            connect_args.setdefault("options", " ".join(options))
    kwargs["connect_args"] = connect_args
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", POOL_SIZE)
    kwargs.setdefault("max_overflow", 10)
    return create_engine(url, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the service layer commits)."""
    return sessionmaker(engine, expire_on_commit=False)
