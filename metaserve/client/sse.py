"""Server-Sent Events as the API streams them (a job's events, its followed log)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


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
