"""Alembic environment. The URL comes from the config (set by :mod:`metaserve.service.migrate`) or,
when run by the ``alembic`` command, from :func:`metaserve.service.settings.get_settings`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from metaserve.service.db import make_engine
from metaserve.service.orm import Base
from metaserve.service.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def _configure(connection: Connection | None = None, **kwargs) -> None:  # noqa: ANN003
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=True,
        **({"connection": connection} if connection is not None else kwargs),
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
