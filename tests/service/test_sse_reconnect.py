"""The SDK's event and log streams survive a half-open connection: a real server socket that
sends one event and then goes silent, without closing (what a vanished peer or NAT looks like
from the client). The client drops it after ``stream_read_timeout`` and resumes after the last
event it received; without the read timeout it would wait on that socket forever."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, urlsplit

from metaserve.client import Client

READ_TIMEOUT_S = 0.5
BOUND_S = 60  # the test's own bound on the whole exchange (it would hang without the fix)


def _read_head(conn: socket.socket) -> tuple[str, dict[str, str]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _sse_head() -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\nconnection: close\r\n\r\n")


@contextmanager
def silent_then_finishing_server(first: bytes, second: bytes) -> Iterator[tuple[str, list]]:
    """A server whose first connection gets ``first`` and then silence (the socket stays open
    until the test ends), and whose second gets ``second`` and a close. Yields its URL and the
    request lines and headers it received."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(BOUND_S)
    requests: list[tuple[str, dict[str, str]]] = []
    done = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        try:
            for body in (first, second):
                conn, _ = listener.accept()
                held.append(conn)
                requests.append(_read_head(conn))
                conn.sendall(_sse_head() + body)
                if body is second:
                    conn.close()
            done.wait(BOUND_S)  # the first connection stays open and silent until the end
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", requests
    finally:
        done.set()
        for conn in held:
            conn.close()
        listener.close()
        thread.join(5)


def _bounded(fn: Callable[[], list]) -> list:
    """Run ``fn`` on a thread; fail (instead of hanging the suite) if it is still running
    after BOUND_S."""
    result: list = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.extend(fn())
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(BOUND_S)
    assert not thread.is_alive(), f"the stream still waits on a silent connection after {BOUND_S} s"
    if errors:
        raise errors[0]
    return result


def _event(event_id: str, kind: str, data: dict) -> bytes:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def test_a_silent_event_stream_is_resumed_after_the_last_event():
    first = b"retry: 1000\n\n" + _event("7", "status", {"status": "running"})
    second = _event("8", "status", {"status": "succeeded"})
    with silent_then_finishing_server(first, second) as (url, requests):
        with Client(url, "test-key", stream_read_timeout=READ_TIMEOUT_S) as client:
            reconnects: list[int] = []
            events = _bounded(lambda: list(client.events(
                "job1", on_reconnect=lambda: reconnects.append(1))))
    assert [(event.id, event.data["status"]) for event in events] == [
        ("7", "running"), ("8", "succeeded")]
    assert len(reconnects) == 1
    assert [line.split()[1] for line, _ in requests] == ["/v1/jobs/job1/events"] * 2
    assert "last-event-id" not in requests[0][1]
    assert requests[1][1]["last-event-id"] == "7"


def test_a_silent_log_stream_is_resumed_after_the_last_record():
    record = {"seq": 5, "source": "driver pid 1", "message": "iteration 10"}
    first = _event("5", "log", record)
    second = _event("6", "log", {**record, "seq": 6, "message": "iteration 20"}) + _event(
        "6", "end", {})
    with silent_then_finishing_server(first, second) as (url, requests):
        with Client(url, "test-key", stream_read_timeout=READ_TIMEOUT_S) as client:
            records = _bounded(lambda: list(client.follow_logs("job1")))
    assert [record["seq"] for record in records] == [5, 6]
    queries = [parse_qs(urlsplit(line.split()[1]).query) for line, _ in requests]
    assert [query["after"] for query in queries] == [["0"], ["5"]]
