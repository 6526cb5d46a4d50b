"""The HTTP protocol ``metaserve serve`` runs uvicorn with: uvicorn's httptools protocol with
limits on a request's head (header and URL bytes, the time to send it), on connections (per
client address and in all) and the time a request was read, which the request histogram of
``GET /metrics`` starts from (:mod:`metaserve.service.telemetry`). The ASGI middlewares, which see
a request once it is parsed, are in :mod:`metaserve.api.middleware`."""

from __future__ import annotations

import json
import math
import time

from metaserve.api.errors import error_body
from metaserve.service.telemetry import RECEIVED_AT

PEER = "metaserve.peer"
"""``scope["extensions"][PEER]``: the address of the connection a request came on (the socket's
peer, which the connection limits count, whatever a proxy header says)."""


class AuthFailures:
    """Failed authentications (answers 401) per connection address, in fixed windows of
    ``window_s``: an address with ``limit`` of them in its window has its new connections
    answered 429 until the window ends, before a byte of them is read (``limit`` 0: never).

    A client without a valid key that reconnects as soon as it is answered costs the server a
    connection, a parsed head and a 401 each time, thousands a second from a few addresses;
    refused at the connection it costs an accept and a write. Addresses are forgotten when
    their window ends; at most ``max_addresses`` are remembered (the oldest windows go first),
    so the table is bounded whatever the number of addresses."""

    def __init__(self, limit: int, window_s: float, max_addresses: int = 65536) -> None:
        self.limit, self.window_s, self.max_addresses = limit, window_s, max_addresses
        self._windows: dict[str, list[float]] = {}  # address -> [window start, failures]

    def record(self, address: str, now: float | None = None) -> None:
        if self.limit <= 0 or not address:
            return
        now = time.monotonic() if now is None else now
        window = self._windows.get(address)
        if window is None or now - window[0] >= self.window_s:
            if window is None and len(self._windows) >= self.max_addresses:
                self._forget(now)
            self._windows[address] = [now, 1]
        else:
            window[1] += 1

    def refused_for(self, address: str, now: float | None = None) -> float:
        """Seconds the address's new connections are still refused; 0 if they are not."""
        window = self._windows.get(address)
        if window is None or window[1] < self.limit:
            return 0.0
        left = window[0] + self.window_s - (time.monotonic() if now is None else now)
        return max(0.0, left)

    def _forget(self, now: float) -> None:
        """Drop the ended windows; if none has ended, the oldest half."""
        ended = [address for address, (start, _) in self._windows.items()
                 if now - start >= self.window_s]
        if not ended:
            ended = sorted(self._windows, key=lambda address: self._windows[address][0])
            ended = ended[:max(1, len(ended) // 2)]
        for address in ended:
            del self._windows[address]


def limited_http_protocol(*, max_header_bytes: int, max_url_bytes: int,
                          header_timeout_s: float, body_timeout_s: float = 30.0,
                          body_min_bytes_per_s: int = 64 * 1024,
                          max_connections: int = 1000,
                          max_connections_per_client: int = 64,
                          auth_failures: AuthFailures | None = None) -> type:
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

    Failed authentications. An address that ``auth_failures`` (:class:`AuthFailures`, fed by
    :class:`metaserve.api.middleware.AuthFailureMiddleware`) counts as over its limit has its
    new connections answered 429 (``Retry-After``: the rest of its window) and closed before a
    byte of them is read.

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
            refused_for = (auth_failures.refused_for(self._client_host)
                           if auth_failures is not None else 0.0)
            if refused_for > 0:
                self._refuse(429, "too_many_failed_authentications",
                             f"{auth_failures.limit} requests from this address were refused "
                             f"401 within {auth_failures.window_s:g} s; retry with a valid key "
                             "later", retry_after_s=math.ceil(refused_for))
                return
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
            extensions = self.scope.setdefault("extensions", {})
            extensions[RECEIVED_AT], extensions[PEER] = self._read_at, self._client_host

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
            phrase = {408: "Request Timeout", 414: "URI Too Long", 429: "Too Many Requests",
                      431: "Request Header Fields Too Large",
                      503: "Service Unavailable"}[status]
            retry = b"retry-after: %d\r\n" % retry_after_s if retry_after_s is not None else b""
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"%sconnection: close\r\n\r\n%s" % (status, phrase.encode(), len(body), retry,
                                                     body))
            self.transport.close()

    return LimitedHttpToolsProtocol
