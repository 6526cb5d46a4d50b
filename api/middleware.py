"""The API's ASGI middlewares: the request body limit (a declared ``Content-Length`` above the
limit is refused before anything is read; a streamed (chunked) body is counted as it arrives
and refused as soon as it passes the limit, without reading the rest), security headers,
``OPTIONS``, the API key checked before a body is read, and control characters refused in a
request's path, query and headers. Limits on a request's head and on connections act earlier, in the
HTTP protocol (:mod:`metaserve.api.http_protocol`)."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metaserve.api.errors import error_body
from metaserve.api.http_protocol import PEER


class BodySizeLimitMiddleware:
    """``own_limit_paths``: routes that take larger bodies (a dataset upload); they count
    their own bytes against their own setting and name it in their 413."""

    def __init__(self, app: ASGIApp, max_body_bytes: int,
                 own_limit_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.own_limit_paths = own_limit_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") in self.own_limit_paths:
            await self.app(scope, receive, send)  # the route checks its own limit
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._reject(send)
            return

        received = 0
        rejected = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    rejected = True
                    if not response_started:
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if rejected:
                return  # our 413 went out already; drop what the app says after the disconnect
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(error_body(
            "payload_too_large",
            f"request body is larger than the limit of {self.max_body_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# --------------------------------------------------------------------------- security headers

HTML_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'; object-src 'none'")
"""Every HTML page of this server: only this origin's scripts, styles and API (the vendored
assets; no CDN), inline styles for uPlot's and Swagger UI's positioning, never framed."""
NON_HTML_CSP = "default-src 'none'; frame-ancestors 'none'"
"""A JSON or file answer opened in a browser runs nothing and is never framed."""


class SecurityHeadersMiddleware:
    """On every response: ``X-Content-Type-Options: nosniff`` (a JSON error or an artifact is
    never run as a script or page) and a ``Content-Security-Policy`` where the route set none
    — :data:`HTML_CSP` for HTML (the dashboard at ``/`` and at ``/static/index.html``, or any
    other page), :data:`NON_HTML_CSP` otherwise — with ``X-Frame-Options: DENY`` and
    ``Referrer-Policy: no-referrer`` for browsers that predate ``frame-ancestors``. A route
    with inline scripts (``/docs``) sets its own policy with their hashes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                html = any(name.lower() == b"content-type" and value.startswith(b"text/html")
                           for name, value in headers)
                added = [(b"x-content-type-options", b"nosniff"),
                         (b"content-security-policy",
                          (HTML_CSP if html else NON_HTML_CSP).encode()),
                         (b"x-frame-options", b"DENY"),
                         (b"referrer-policy", b"no-referrer")]
                headers += [(name, value) for name, value in added if name not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------- OPTIONS

class OptionsMiddleware:
    """``OPTIONS`` on a path this server routes is answered 204 with ``Allow`` naming its
    methods (RFC 9110 §9.3.7), without a key (the methods are the public schema's); a method
    the path does not have is 405 with ``Allow`` naming all it has; on any other path both
    are the 404 every method gets there. (GET, HEAD and POST go straight to the routes: every
    path that has a route has one of them, so only a 405 of those is Starlette's.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "POST"):
            allowed = _allowed_methods(scope)
            if allowed and scope["method"] == "OPTIONS":
                await send({"type": "http.response.start", "status": 204,
                            "headers": [(b"allow", ", ".join(sorted(allowed)).encode())]})
                await send({"type": "http.response.body", "body": b""})
                return
            if allowed and scope["method"] not in allowed:
                # Starlette's own 405 names the methods of the first route that matched the
                # path only (POST of POST /v1/jobs, not GET of GET /v1/jobs).
                body = json.dumps(error_body("method_not_allowed", "Method Not Allowed")).encode()
                await send({"type": "http.response.start", "status": 405, "headers": [
                    (b"allow", ", ".join(sorted(allowed - {"OPTIONS"})).encode()),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _allowed_methods(scope: Scope) -> set[str]:
    """Every method of every route whose path matches (with OPTIONS); empty if none does."""
    allowed = _methods_of(getattr(scope.get("app"), "routes", []), scope)
    return allowed | {"OPTIONS"} if allowed else set()


def _methods_of(routes, scope: Scope) -> set[str]:  # noqa: ANN001
    from starlette.routing import Match, Mount

    allowed: set[str] = set()
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's include_router wrapper
        if included is not None:
            allowed |= _methods_of(included.routes, scope)
            continue
        match, _ = route.matches(scope)
        if match == Match.NONE:
            continue
        if isinstance(route, Mount):
            allowed |= {"GET", "HEAD"}  # static files
        else:
            allowed |= set(getattr(route, "methods", None) or ())
    return allowed


# --------------------------------------------------------------------------- failed keys

class AuthFailureMiddleware:
    """Counts each 401 this app answers against the address of the connection it came on
    (:data:`metaserve.api.http_protocol.PEER`, set by ``metaserve serve``'s protocol, which
    then refuses an address over its limit at the connection: :class:`AuthFailures`)."""

    def __init__(self, app: ASGIApp, failures) -> None:  # noqa: ANN001 - an AuthFailures
        self.app, self.failures = app, failures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        peer = scope.get("extensions", {}).get(PEER) if scope["type"] == "http" else None
        if not peer or self.failures.limit <= 0:
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                self.failures.record(peer)
            await send(message)

        await self.app(scope, receive, counting_send)


# --------------------------------------------------------------------------- key before body

class AuthenticateBeforeBodyMiddleware:
    """A request with a body to an authenticated route (every ``/v1/`` route) has its API key
    checked before a byte of the body is read: without a valid key it is answered 401 at once
    and its connection closed, so a client without a key cannot hold a connection by sending
    its body slowly (FastAPI reads the body before it resolves the key dependency)."""

    def __init__(self, app: ASGIApp, protected_prefix: str = "/v1/") -> None:
        self.app = app
        self.protected_prefix = protected_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope.get("path", "").startswith(self.protected_prefix)
                and _has_body(scope)):
            from metaserve.api.deps import user_of_key
            from metaserve.service.exceptions import Unauthorized

            try:
                await user_of_key(scope["app"], _bearer_key(scope))
            except Unauthorized as refused:
                body = json.dumps(error_body(refused.code, refused.message)).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"www-authenticate", b"Bearer"),
                                        (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


def _bearer_key(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" else None
    return None


# --------------------------------------------------------------------------- control characters

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""C0, DEL and C1 controls: NUL (PostgreSQL text cannot hold it: a 500 there, a stored name
on SQLite), ESC and CSI (terminal escapes), CR/LF (log lines)."""


class ControlCharacterMiddleware:
    """422 naming the field for a control character in a path parameter (``job_id``...), a
    query parameter or a header value (``idempotency-key``, ``last-event-id``...), before any
    route or database sees it. JSON bodies are checked by their schemas (every string of a
    job spec: :class:`metaserve.workers.spec.StrictModel`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = _control_character_field(scope)
            if found is not None:
                field, where = found
                body = json.dumps(error_body(
                    "validation_error", f"invalid request: {field}",
                    [{"field": field, "message": "control characters are not allowed",
                      "type": "value_error", "in": where}])).encode()
                await send({"type": "http.response.start", "status": 422,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _control_character_field(scope: Scope) -> tuple[str, str] | None:
    for name, value in scope.get("headers", []):
        if CONTROL_CHARACTERS.search(value.decode("latin-1").replace("\t", " ")):
            return name.decode("latin-1"), "header"
    query = scope.get("query_string", b"").decode("latin-1")
    if query:
        for name, value in parse_qsl(query, keep_blank_values=True):
            if CONTROL_CHARACTERS.search(name + value):
                return (name if not CONTROL_CHARACTERS.search(name) else "query"), "query"
    path = scope.get("path", "")
    if CONTROL_CHARACTERS.search(path):
        return _path_parameter(scope, path), "path"
    return None


def _path_parameter(scope: Scope, path: str) -> str:
    """The name of the path parameter holding the control character, found by matching the
    path against the OpenAPI document's path templates (``path`` if none matches)."""
    app = scope.get("app")
    for pattern in _path_patterns(app):
        match = pattern.match(path)
        if match:
            for name, value in match.groupdict().items():
                if CONTROL_CHARACTERS.search(value):
                    return name
    return "path"


def _path_patterns(app) -> list[re.Pattern]:  # noqa: ANN001
    patterns = getattr(getattr(app, "state", None), "path_parameter_patterns", None)
    if patterns is None and app is not None:
        from starlette.routing import compile_path

        patterns = [compile_path(template)[0] for template in app.openapi().get("paths", {})
                    if "{" in template]
        app.state.path_parameter_patterns = patterns
    return patterns or []
