"""Request body limit as a pure ASGI middleware: a declared ``Content-Length`` above the
limit is refused before anything is read; a streamed (chunked) body is counted as it
arrives and refused as soon as it passes the limit, without reading the rest."""

from __future__ import annotations

import json
import re
import time
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metaserve.api.errors import error_body
from metaserve.service.telemetry import RECEIVED_AT


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


# --------------------------------------------------------------------------- request head limits

def limited_http_protocol(*, max_header_bytes: int, max_url_bytes: int,
                          header_timeout_s: float, body_timeout_s: float = 30.0,
                          body_min_bytes_per_s: int = 64 * 1024,
                          max_connections: int = 1000,
                          max_connections_per_client: int = 64) -> type:
    """uvicorn's httptools protocol with bounds on what one client may hold, for
    ``metaserve serve``.

    The request head. httptools sets no limit on a request line or header: uvicorn appends
    every fragment of the URL to a bytes object, httptools every fragment of a header value,
    so a client streaming a 128 MB header held the event loop for ~22 s (quadratic copying),
    ``/healthz`` included. Here the bytes of a request head are counted per ``data_received``
    call (a chunk of at most what the socket read, parsed in microseconds) and the connection
    is answered 431 (head) or 414 (URL) and closed as soon as a bound is passed; a head not
    complete within ``header_timeout_s`` (a silent connection too) is answered 408 and closed.
    A URL that passes its bound in the read that also ends the head is refused there (414),
    never served as the fragments read before it.

    The body. It must be complete within ``body_timeout_s`` of its head plus the time its
    bytes so far need at ``body_min_bytes_per_s``, else 408 and closed: a client sending a
    byte every few seconds holds a connection for ``body_timeout_s``, not forever. (Its size
    is bounded by ``BodySizeLimitMiddleware``; its key is checked before it is read, by
    ``AuthenticateBeforeBodyMiddleware``.)

    Connections. At most ``max_connections_per_client`` per client address and
    ``max_connections`` in all: at a cap the connection (of that address; of anyone) that has
    waited longest on its client (for a head or a body, or idle between requests; not one
    whose request is being answered, such as an event stream) is answered 503 and closed to
    make room, and only when there is none is the new one refused (503). So slow clients
    cannot take every file descriptor, and a new ``/healthz`` is answered while they try.

    Each request's scope carries when its first bytes were read
    (``scope["extensions"][RECEIVED_AT]``, ``time.perf_counter()`` of the ``data_received``
    call that began its head): the request histogram times from there, so the time a request
    waits after it was read (for the event loop to parse it and run its task, behind the
    requests read with it) is in its latency."""
    from collections import Counter, OrderedDict

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    open_connections: OrderedDict[HttpToolsProtocol, None] = OrderedDict()
    """Every connection of this server, oldest first."""
    per_client: Counter[str] = Counter()

    class _UrlTooLong(Exception):
        """Raised from a parser callback to stop parsing a refused request."""

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            self._head_open = True  # waiting for (the rest of) a request head
            self._head_bytes = 0
            self._url_bytes = 0
            self._head_timer = None
            self._body_timer = None
            self._body_started = 0.0
            self._body_bytes = 0
            self._refused = False
            self._heads_completed = 0
            self._read_at = time.perf_counter()
            self._client_host = ""
            self._counted = False

        # ---------------------------------------------------------------- connection caps

        def connection_made(self, transport) -> None:  # noqa: ANN001
            super().connection_made(transport)
            self._client_host = self.client[0] if self.client else ""
            if (per_client[self._client_host] >= max_connections_per_client
                    and not self._evict_one(self._client_host)):
                self._refuse(503, "too_many_connections",
                             f"{max_connections_per_client} connections from this address are "
                             "open; close one or retry later", retry_after_s=1)
                return
            if len(open_connections) >= max_connections and not self._evict_one(None):
                self._refuse(503, "too_many_connections",
                             f"the server holds {max_connections} connections; retry later",
                             retry_after_s=1)
                return
            open_connections[self] = None
            per_client[self._client_host] += 1
            self._counted = True
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:  # noqa: ANN001
            self._disarm_head_timer()
            self._disarm_body_timer()
            if self._counted:
                self._counted = False
                open_connections.pop(self, None)
                per_client[self._client_host] -= 1
                if per_client[self._client_host] <= 0:
                    del per_client[self._client_host]
            super().connection_lost(exc)

        def _waiting_on_client(self) -> bool:
            if self._refused or self.transport is None or self.transport.is_closing():
                return False
            if self._body_timer is not None:
                return True  # its body is being read
            return self._head_open and (self.cycle is None or self.cycle.response_complete)

        @staticmethod
        def _evict_one(client_host: str | None) -> bool:
            """Close the oldest connection (of ``client_host``; of anyone: None) that waits on
            its client; False if there is none."""
            for connection in open_connections:
                if ((client_host is None or connection._client_host == client_host)
                        and connection._waiting_on_client()):
                    connection._refuse(503, "connection_evicted",
                                       "the server is at its connection cap and this "
                                       "connection was waiting longest on its client")
                    open_connections.pop(connection, None)
                    return True
            return False

        # ---------------------------------------------------------------- head and body

        def data_received(self, data: bytes) -> None:
            self._read_at = time.perf_counter()
            if self._refused:
                return
            if self._head_open and self._head_timer is None and self._body_timer is None:
                self._arm_head_timer()
            if self._body_timer is not None:
                self._body_bytes += len(data)
            heads_before = self._heads_completed
            super().data_received(data)
            if (not self._head_open or self._refused or self.parser is None
                    or self._heads_completed != heads_before):
                return  # a head or message ended in this chunk: not all of it was a head
            self._head_bytes += len(data)
            if self._url_bytes > max_url_bytes:
                self._refuse_long_url()
            elif self._head_bytes > max_header_bytes:
                self._refuse(431, "request_header_fields_too_large",
                             f"request head is larger than the limit of {max_header_bytes} bytes")

        def send_400_response(self, msg: str) -> None:
            if not self._refused:  # a refusal from a callback was written already
                super().send_400_response(msg)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_open, self._url_bytes = True, 0
            self.scope.setdefault("extensions", {})[RECEIVED_AT] = self._read_at

        def on_url(self, url: bytes) -> None:
            self._url_bytes += len(url)
            if self._url_bytes <= max_url_bytes:  # past it, stop copying: refused below
                super().on_url(url)

        def on_headers_complete(self) -> None:
            if self._url_bytes > max_url_bytes:
                # The head ended in the read that passed the bound: what was copied is only
                # the URL's first fragments, never to be served as the request.
                self._refuse_long_url()
                raise _UrlTooLong
            self._heads_completed += 1
            self._head_open, self._head_bytes = False, 0
            self._disarm_head_timer()
            self._arm_body_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm_body_timer()
            super().on_message_complete()
            self._heads_completed += 1  # (counts as a boundary too, see data_received)
            self._head_open, self._head_bytes = True, 0  # the next request's head, if any

        def _refuse_long_url(self) -> None:
            self._refuse(414, "uri_too_long",
                         f"request target is longer than the limit of {max_url_bytes} bytes")

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._head_open and not self._refused and not self.transport.is_closing():
                if self.cycle is not None and not self.cycle.response_complete:
                    return  # a response is still going out (pipelining); keep-alive bounds it
                self._refuse(408, "request_timeout",
                             f"no complete request head within {header_timeout_s:g} s")

        def _arm_body_timer(self) -> None:
            self._disarm_body_timer()
            self._body_started, self._body_bytes = time.monotonic(), 0
            self._body_timer = self.loop.call_later(body_timeout_s, self._body_check)

        def _disarm_body_timer(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _body_check(self) -> None:
            """The deadline moves with the bytes received (a fast upload of any size is
            never cut); a body behind it is refused."""
            self._body_timer = None
            deadline = (self._body_started + body_timeout_s
                        + self._body_bytes / body_min_bytes_per_s)
            left = deadline - time.monotonic()
            if left > 0:
                self._body_timer = self.loop.call_later(left, self._body_check)
                return
            if self._refused or self.transport.is_closing():
                return
            if self.cycle is not None and self.cycle.response_started:
                # Answered already (a 401 before the body): nothing more to say, only close.
                self._refused = True
                self.transport.close()
                return
            self._refuse(408, "request_timeout",
                         f"the request body was not complete within {body_timeout_s:g} s")

        def _refuse(self, status: int, code: str, message: str,
                    retry_after_s: int | None = None) -> None:
            self._refused = True
            self._disarm_head_timer()
            self._disarm_body_timer()
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the app's receive() says so; its send is dropped
                self.cycle.message_event.set()
            body = json.dumps(error_body(code, message)).encode()
            phrase = {408: "Request Timeout", 414: "URI Too Long",
                      431: "Request Header Fields Too Large",
                      503: "Service Unavailable"}[status]
            retry = b"retry-after: %d\r\n" % retry_after_s if retry_after_s is not None else b""
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"%sconnection: close\r\n\r\n%s" % (status, phrase.encode(), len(body), retry,
                                                     body))
            self.transport.close()

    return LimitedHttpToolsProtocol


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
