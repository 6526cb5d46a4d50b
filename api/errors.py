"""One error shape for every 4xx/5xx response:

``{"error": {"code": "validation_error", "message": "...", "details": [{"field": "algorithm", "message": "..."}]}}``
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from metaserve.service.exceptions import MetaserveError

logger = logging.getLogger(__name__)

_LOCATIONS = ("body", "query", "path", "header", "cookie")


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details or []}}


def error_response(status_code: int, code: str, message: str,
                   details: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status_code,
                        headers=headers)


def field_path(loc: tuple[Any, ...] | list[Any], body: Any) -> str:
    """Dotted path of a validation error, e.g. ``algorithm.inner_lr``.

    Pydantic puts the tag of a discriminated union into ``loc``
    (``algorithm.maml.inner_lr``); walking the submitted body alongside drops it.
    """
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    path: list[str] = []
    node = body
    for item in parts:
        if isinstance(node, dict):
            if item in node:
                path.append(str(item))
                node = node[item]
                continue
            if node.get("name") == item:
                continue  # the discriminator tag, not a field
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            path.append(str(item))
            node = node[item]
            continue
        elif isinstance(item, str) and item.startswith("function-"):
            continue
        path.append(str(item))
        node = None
    return ".".join(path)


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        detail: dict[str, Any] = {"field": field_path(loc, exc.body),
                                  "message": error.get("msg", "invalid"),
                                  "type": error.get("type", "value_error")}
        if loc and loc[0] in _LOCATIONS[1:]:
            detail["in"] = loc[0]
        details.append(detail)
    return details


async def _on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    details = _validation_details(exc)
    fields = ", ".join(sorted({d["field"] or "body" for d in details}))
    return error_response(422, "validation_error", f"invalid request: {fields}", details)


async def _on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    message = exc.detail if isinstance(exc.detail, str) else phrase
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _on_metaserve_error(_request: Request, exc: MetaserveError) -> JSONResponse:
    details = [{"field": key, "message": str(value)} for key, value in exc.details.items()]
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    headers = getattr(exc, "headers", None) or headers  # e.g. Retry-After of a 429
    if exc.status_code >= 500:
        logger.error("metaserve error", extra={"code": exc.code, "error_message": exc.message})
    return error_response(exc.status_code, exc.code, exc.message, details, headers)


async def _on_unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(MetaserveError, _on_metaserve_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
