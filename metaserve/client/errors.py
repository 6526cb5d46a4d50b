"""The client's errors (one module for the client side): every error response of the API
(``{"error": {"code", "message", "details"}}``) is raised as an :class:`ApiError` subclass
carrying the server's message; :func:`error_from_response` picks the class by status."""

from __future__ import annotations

from typing import Any

import httpx


class MetaserveClientError(Exception):
    """A metaserve client error."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or type(self).__name__).strip()
        super().__init__(self.message)


class ConnectionFailed(MetaserveClientError):
    """Could not reach the metaserve server."""


class NotConfigured(MetaserveClientError):
    """No API key: run `metaserve login`, or set METASERVE_API_KEY."""


class ApiError(MetaserveClientError):
    """An error response of the API; ``code``, ``message`` and ``details`` are the server's."""

    def __init__(self, status_code: int, code: str, message: str,
                 details: list[dict[str, Any]] | None = None) -> None:
        self.status_code, self.code, self.details = status_code, code, details or []
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message} ({self.status_code} {self.code})"


class BadRequest(ApiError):
    """400: e.g. an invalid pagination cursor."""


class Unauthorized(ApiError):
    """401: missing or invalid API key."""


class NotFound(ApiError):
    """404: no such job of yours, or no such artifact."""


class Conflict(ApiError):
    """409: the job's state does not allow this (e.g. cancel a finished job)."""


class PayloadTooLarge(ApiError):
    """413: a request body or array above the server's bounds."""


class InvalidRequest(ApiError):
    """422: invalid input; ``details`` name each bad field."""


class ServerError(ApiError):
    """5xx: the server failed."""


_ERRORS_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 401: Unauthorized, 403: Unauthorized,
                                                404: NotFound, 409: Conflict, 413: PayloadTooLarge,
                                                422: InvalidRequest}


def error_from_response(response: httpx.Response) -> ApiError:
    """The typed exception of an error response (any status ≥ 400)."""
    try:
        error = response.json()["error"]
        code, message, details = str(error["code"]), str(error["message"]), error.get("details") or []
    except (ValueError, KeyError, TypeError):
        code, message, details = "http_error", response.text.strip()[:500] or response.reason_phrase, []
    if response.status_code >= 500:
        cls: type[ApiError] = ServerError
    else:
        cls = _ERRORS_BY_STATUS.get(response.status_code, ApiError)
    return cls(response.status_code, code, message, details)
