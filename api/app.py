"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.middleware import BodySizeLimitMiddleware
from api.routes import ROUTERS
from service.auth import KeyCache
from service.db import make_engine, session_factory
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def _start_dispatcher(app: FastAPI) -> None:
    """Run the job dispatcher inside the server when settings say so (the embedded default)."""
    app.state.dispatcher = None
    if not app.state.settings.dispatcher:
        return
    try:
        from service.dispatcher import Dispatcher, embedded_worker_id
    except ImportError:
        logger.warning("service.dispatcher is not available; jobs stay queued")
        return
    settings = app.state.settings
    dispatcher = Dispatcher(settings, app.state.session_factory,
                            worker_id=embedded_worker_id(settings))
    dispatcher.start()
    app.state.dispatcher = dispatcher


def _stop_dispatcher(app: FastAPI) -> None:
    dispatcher = getattr(app.state, "dispatcher", None)
    if dispatcher is not None:
        dispatcher.stop()
        app.state.dispatcher = None


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    _start_dispatcher(app)
    try:
        yield
    finally:
        _stop_dispatcher(app)
        app.state.engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for ``settings`` (default: the environment's). Does not migrate the database;
    ``metaserve serve`` and ``metaserve db upgrade`` do."""
    settings = settings or get_settings()
    app = FastAPI(
        title="metaserve",
        version="0.1.0",
        summary="Meta-learning jobs (MAML, Reptile, ANIL, Meta-SGD, prompt tuning) on Ray.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.engine = make_engine(settings.database_url)
    app.state.session_factory = session_factory(app.state.engine)
    app.state.key_cache = KeyCache()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    for router in ROUTERS:
        app.include_router(router)
    return app
