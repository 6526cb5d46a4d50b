"""Server-Sent Events as the API streams them (a job's events, its followed log).

The server writes a ``: keep-alive`` comment on an idle stream every 15 s
(``api/routes/events.py`` ``KEEPALIVE_S``), so a stream silent for :data:`READ_TIMEOUT_S` is
dead even when its TCP connection looks open (a half-open connection: a peer or a NAT that
vanished without a FIN or RST). The client then drops it and reconnects after the last event it
received (``Last-Event-ID``, or ``after`` for a log), instead of waiting on it forever.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

KEEPALIVE_S = 15.0  # what the server promises (api/routes/events.py)
READ_TIMEOUT_S = 3 * KEEPALIVE_S  # three missed keep-alives: the stream is dead


def stream_timeout(connect_s: float, read_s: float = READ_TIMEOUT_S) -> httpx.Timeout:
    """The timeouts of an event or log stream: ``read_s`` bounds the silence between two
    lines (keep-alives included), not the stream's length."""
    return httpx.Timeout(connect_s, read=read_s)


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of ``GET /v1/jobs/{id}/events``: ``kind`` is ``status``,
    ``metrics`` or ``progress``; ``id`` is what to pass as ``Last-Event-ID`` to resume."""

    id: str
    kind: str
    data: dict[str, Any]


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events from the lines of a ``text/event-stream`` (comments and retry lines skipped)."""
    event_id, kind, data = "", "message", []
    for line in lines:
        if line == "":
            if data:
                yield Event(event_id, kind, json.loads("\n".join(data)))
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            event_id = value
        elif name == "event":
            kind = value
        elif name == "data":
            data.append(value)
