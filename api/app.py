"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from metaserve.api.errors import install_error_handlers
from metaserve.api.http_protocol import AuthFailures
from metaserve.api.middleware import (
    AuthenticateBeforeBodyMiddleware,
    AuthFailureMiddleware,
    BodySizeLimitMiddleware,
    ControlCharacterMiddleware,
    OptionsMiddleware,
    SecurityHeadersMiddleware,
)
from metaserve.api.routes import ROUTERS, datasets
from metaserve.api.routes import dashboard
from metaserve.api.routes.prometheus import MetricsMiddleware, dispatcher_connected
from metaserve.service.adapt_pool import AdaptPool
from metaserve.service.auth import KeyCache
from metaserve.service.db import engine_timeouts, make_engine, session_factory
from metaserve.service.limits import warm_up_cost_model
from metaserve.service.settings import Settings, get_settings
from metaserve.service.telemetry import GC_PAUSES, Telemetry

logger = logging.getLogger(__name__)

FREEZE_WAIT_S = 120.0
FULL_COLLECTION_THRESHOLD = 100
"""Collections of generation 1 between two full ones, once the start-up objects are frozen
(CPython's default: 10). What a full collection walks then is what the server holds live —
its open connections and streams: 70-100 k objects with 300 event streams and 1,100 slow
clients, 30-60 ms with every thread stopped, found almost no garbage (0-200 objects) each
time, and came every 8-20 s under the hostile load: the /healthz tail
(docs/notes/hostile-load-tail.md). Ten times rarer, they cost the same each; cycles that
reached the oldest generation wait ten times longer to be freed."""


def _start_dispatcher(app: FastAPI) -> None:
    """Run the job dispatcher inside the server when settings say so (the embedded default)."""
    app.state.dispatcher = None
    if not app.state.settings.dispatcher:
        return
    try:
        from metaserve.service.dispatcher import Dispatcher, embedded_worker_id
    except ImportError:
        logger.warning("metaserve.service.dispatcher is not available; jobs stay queued")
        return
    settings = app.state.settings
    sessions = app.state.session_factory
    if app.state.engine.dialect.name == "postgresql":  # its own connections: engine_timeouts
        app.state.dispatcher_engine = make_engine(
            settings.database_url, **engine_timeouts(settings, dispatcher=True))
        sessions = session_factory(app.state.dispatcher_engine)
    dispatcher = Dispatcher(settings, sessions, worker_id=embedded_worker_id(settings))
    dispatcher.start()
    app.state.dispatcher = dispatcher


def _stop_dispatcher(app: FastAPI) -> None:
    dispatcher = getattr(app.state, "dispatcher", None)
    if dispatcher is not None:
        dispatcher.stop()
        app.state.dispatcher = None
    engine = getattr(app.state, "dispatcher_engine", None)
    if engine is not None:
        engine.dispose()
        app.state.dispatcher_engine = None


async def _freeze_startup_objects(app: FastAPI) -> None:
    """Move what start-up created (Ray's and torch's modules: ~170 k objects) out of the
    garbage collector's view once the dispatcher is connected. Without this every full
    collection walks them all and stalls the event loop for 100-400 ms, the largest part of
    the status-poll tail before (docs/RELIABILITY.md, "Load"). Full collections are made
    rarer from then on (:data:`FULL_COLLECTION_THRESHOLD`)."""
    dispatcher = getattr(app.state, "dispatcher", None)
    deadline = time.monotonic() + FREEZE_WAIT_S
    while (dispatcher is not None and not dispatcher.ray_ready.is_set()
           and time.monotonic() < deadline):
        await asyncio.sleep(0.5)
    await asyncio.to_thread(warm_up_cost_model)
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_THRESHOLD)
    logger.info("start-up objects frozen", extra={"objects": GC_PAUSES.record_freeze(),
                                                   "threshold": gc.get_threshold()})


class _PathWithoutQuery(logging.Filter):
    """uvicorn's access log line without the query string (it may carry a cursor, an event
    id, or whatever a client put there): ``"GET /v1/jobs HTTP/1.1" 200``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].partition("?")[0], *args[3:])
        return True


def _access_log_without_query() -> None:
    """Installed at start-up, after uvicorn configured its loggers; once per process."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _PathWithoutQuery) for f in access.filters):
        access.addFilter(_PathWithoutQuery())


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    _access_log_without_query()
    _start_dispatcher(app)
    freezer = (asyncio.create_task(_freeze_startup_objects(app)) if app.state.freeze_gc
               else None)
    try:
        yield
    finally:
        if freezer is not None:
            freezer.cancel()
        _stop_dispatcher(app)
        app.state.adapt_pool.shutdown()
        app.state.engine.dispose()


def create_app(settings: Settings | None = None, *, freeze_gc: bool = False) -> FastAPI:
    """The API for ``settings`` (default: the environment's). Does not migrate the database;
    ``metaserve serve`` and ``metaserve db upgrade`` do. ``freeze_gc``: freeze the start-up
    objects once the dispatcher is up (process-wide, so only for a process that is the
    server: ``metaserve serve`` sets it)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="metaserve",
        version="0.1.0",
        summary="Meta-learning jobs (MAML, Reptile, ANIL, Meta-SGD, prompt tuning) on Ray.",
        lifespan=_lifespan,
        docs_url=None,   # served by routes/dashboard.py from the packaged Swagger UI assets
        redoc_url=None,  # ReDoc's script is not vendored; /docs covers the same schema
    )
    app.state.settings = settings
    app.state.freeze_gc = freeze_gc
    app.state.engine = make_engine(settings.database_url, **engine_timeouts(settings))
    app.state.session_factory = session_factory(app.state.engine)
    app.state.key_cache = KeyCache(ttl_s=settings.key_cache_ttl_s)
    app.state.adapt_pool = AdaptPool(concurrency=settings.adapt_concurrency,
                                     queue=settings.adapt_queue, timeout_s=settings.adapt_timeout_s)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       own_limit_paths=frozenset({"/v1/datasets"}))
    app.add_middleware(AuthenticateBeforeBodyMiddleware)  # the key, before the body is read
    app.state.auth_failures = AuthFailures(limit=settings.auth_failure_limit,
                                           window_s=settings.auth_failure_window_s)
    app.add_middleware(AuthFailureMiddleware, failures=app.state.auth_failures)  # sees every 401
    app.add_middleware(ControlCharacterMiddleware)  # before the body is read
    app.add_middleware(OptionsMiddleware)
    app.state.telemetry = Telemetry(app.state.session_factory, lambda: dispatcher_connected(app))
    app.add_middleware(SecurityHeadersMiddleware)  # on every answer, refusals included
    app.add_middleware(MetricsMiddleware, telemetry=app.state.telemetry)  # counts every answer
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(datasets.router)
    app.mount(dashboard.STATIC_PATH, dashboard.static_files(), name="static")
    _document_every_status(app)
    return app


def _document_every_status(app: FastAPI) -> None:
    """The OpenAPI document names every status an operation can answer, also those that
    come from outside its route: 401 from the key check of every secured operation
    (``AuthenticateBeforeBodyMiddleware`` or the ``CurrentUser`` dependency), 422 for a control
    character in any header, query or path (``ControlCharacterMiddleware``) or malformed JSON,
    413 for a body over its limit (``BodySizeLimitMiddleware``). A client, or a schema
    fuzzer, can then trust the document for what it may get."""
    from metaserve.api.schemas import ErrorResponse

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = FastAPI.openapi(app)
        error = {"content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/ErrorResponse"}}}}
        document.setdefault("components", {}).setdefault("schemas", {}).setdefault(
            "ErrorResponse", ErrorResponse.model_json_schema(
                ref_template="#/components/schemas/{model}"))
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if operation.get("security"):
                    responses.setdefault("401", {"description": "Missing or invalid API key",
                                                 **error})
                responses.setdefault("422", {
                    "description": "A control character in a header, query or path value, or "
                                   "an invalid request, naming the field", **error})
                if "requestBody" in operation:
                    responses.setdefault("413", {"description": "Body above its size limit",
                                                 **error})
        app.openapi_schema = document
        return document

    app.openapi = openapi
