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


# --------------------------------------------------------------------------- request head limits

def limited_http_protocol(*, max_header_bytes: int, max_url_bytes: int,
                          header_timeout_s: float) -> type:
    """uvicorn's httptools protocol with bounds on the request head, for ``metaserve serve``.

    httptools sets no limit on a request line or header: uvicorn appends every fragment of the
    URL to a bytes object, httptools every fragment of a header value, so a client streaming a
    128 MB header held the event loop for ~22 s (quadratic copying), ``/healthz`` included.
    Here the bytes of a request head are counted per ``data_received`` call (a chunk of at most
    what the socket read, parsed in microseconds) and the connection is answered 431 (head) or
    414 (URL) and closed as soon as a bound is passed; a head not complete within
    ``header_timeout_s`` (a silent connection too) is answered 408 and closed. A body is not
    counted (``BodySizeLimitMiddleware`` bounds it).

    Each request's scope carries when its first bytes were read
    (``scope["extensions"][RECEIVED_AT]``, ``time.perf_counter()`` of the ``data_received``
    call that began its head): the request histogram times from there, so the time a request
    waits after it was read (for the event loop to parse it and run its task, behind the
    requests read with it) is in its latency."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            self._head_open = True  # waiting for (the rest of) a request head
            self._head_bytes = 0
            self._url_bytes = 0
            self._head_timer = None
            self._refused = False
            self._heads_completed = 0
            self._read_at = time.perf_counter()

        def connection_made(self, transport) -> None:  # noqa: ANN001
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:  # noqa: ANN001
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._read_at = time.perf_counter()
            if self._refused:
                return
            if self._head_open and self._head_timer is None:
                self._arm_head_timer()
            heads_before = self._heads_completed
            super().data_received(data)
            if (not self._head_open or self._refused or self.parser is None
                    or self._heads_completed != heads_before):
                return  # a head or message ended in this chunk: not all of it was a head
            self._head_bytes += len(data)
            if self._url_bytes > max_url_bytes:
                self._refuse(414, "uri_too_long",
                             f"request target is longer than the limit of {max_url_bytes} bytes")
            elif self._head_bytes > max_header_bytes:
                self._refuse(431, "request_header_fields_too_large",
                             f"request head is larger than the limit of {max_header_bytes} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_open, self._url_bytes = True, 0
            self.scope.setdefault("extensions", {})[RECEIVED_AT] = self._read_at

        def on_url(self, url: bytes) -> None:
            self._url_bytes += len(url)
            if self._url_bytes <= max_url_bytes:  # past it, stop copying: refused after this chunk
                super().on_url(url)

        def on_headers_complete(self) -> None:
            self._heads_completed += 1
            self._head_open, self._head_bytes = False, 0
            self._disarm_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._heads_completed += 1  # (counts as a boundary too, see data_received)
            self._head_open, self._head_bytes = True, 0  # the next request's head, if any

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

        def _refuse(self, status: int, code: str, message: str) -> None:
            self._refused = True
            self._disarm_head_timer()
            body = json.dumps(error_body(code, message)).encode()
            phrase = {408: "Request Timeout", 414: "URI Too Long",
                      431: "Request Header Fields Too Large"}[status]
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, phrase.encode(), len(body), body))
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
