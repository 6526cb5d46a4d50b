"""Bounds on what one client may hold of a live ``metaserve serve``: the request head (431),
the request target (414), a head that never completes (408), while ``/healthz`` keeps
answering; the access log without query strings; files private to the server's user."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from metaserve.service.settings import MAX_HEADER_BYTES, MAX_URL_BYTES
from tests.helpers import wait_until
from tests.server_process import ServerProcess

HUGE = 128 * 1024 * 1024
HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("limits"), METASERVE_DISPATCHER="false",
                           METASERVE_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S))
    server.start()
    yield server
    server.terminate()


class HealthPoller:
    """Polls ``/healthz`` every 20 ms in a thread; the slowest answer is the event loop's
    longest stall (plus a poll's own cost)."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                assert client.get(f"{self.url}/healthz").status_code == 200
                self.latencies.append(time.perf_counter() - started)
                self._stop.wait(0.02)

    def __enter__(self) -> "HealthPoller":
        self._thread.start()
        wait_until(lambda: len(self.latencies) >= 3, 30, "the first /healthz answers")
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(0.2)
        self._stop.set()
        self._thread.join(timeout=30)


def send_until_answered(port: int, head: bytes, filler: bytes, total: int) -> tuple[bytes, int, float]:
    """Send ``head`` then ``filler`` until ``total`` bytes or the server answers or closes;
    returns (the answer, bytes sent, seconds until the answer)."""
    started = time.perf_counter()
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        answer = b""
        deadline = time.monotonic() + 60
        while sent < total and time.monotonic() < deadline:
            try:
                answer += sock.recv(65536)
                break
            except BlockingIOError:
                pass
            try:
                sent += sock.send(filler)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
        elapsed = time.perf_counter() - started
        sock.setblocking(True)
        sock.settimeout(10)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, sent, elapsed


def status_and_error(answer: bytes) -> tuple[bytes, dict]:
    status_line, _, rest = answer.partition(b"\r\n")
    return status_line, json.loads(rest.partition(b"\r\n\r\n")[2])["error"]


def test_a_128_mb_header_is_431_within_milliseconds_and_never_stalls_the_loop(live_server):
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
    with HealthPoller(live_server.url) as poller:
        answer, sent, elapsed = send_until_answered(live_server.port, head, b"a" * 65536, HUGE)
    status_line, error = status_and_error(answer)
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert error == {"code": "request_header_fields_too_large", "details": [],
                     "message": f"request head is larger than the limit of {MAX_HEADER_BYTES} bytes"}
    assert sent < 16 * MAX_HEADER_BYTES + 8 * 1024 * 1024  # the limit plus socket buffers
    assert elapsed < 2.0
    assert max(poller.latencies) < 0.5, max(poller.latencies)


def test_a_128_mb_url_is_414_within_milliseconds_and_never_stalls_the_loop(live_server):
    with HealthPoller(live_server.url) as poller:
        answer, sent, elapsed = send_until_answered(live_server.port, b"GET /healthz?q=",
                                                    b"a" * 65536, HUGE)
    status_line, error = status_and_error(answer)
    assert status_line == b"HTTP/1.1 414 URI Too Long"
    assert error["message"] == f"request target is longer than the limit of {MAX_URL_BYTES} bytes"
    assert elapsed < 2.0
    assert max(poller.latencies) < 0.5, max(poller.latencies)


def test_many_headers_adding_up_past_the_limit_are_431(live_server):
    header = b"X-Pad: " + b"p" * 1000 + b"\r\n"
    answer, _, _ = send_until_answered(live_server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
                                       header * 64, HUGE)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_headers_under_the_limit_and_a_body_over_it_are_served(live_server):
    """The bound is on the head only: a 60 KiB head and a 200 KiB body are a normal request."""
    with live_server.client() as client:
        response = client.post("/v1/jobs", headers={"X-Pad": "p" * 60_000,
                                                        "Content-Type": "application/json"},
                               content=json.dumps({"algorithm": {"name": "maml"},
                                                   "task_family": {"name": "sine"},
                                                   "name": "n" * 100}) + " " * 200_000)
    assert response.status_code == 201, response.text


def test_a_head_that_never_completes_is_408_after_the_header_timeout(live_server):
    with socket.create_connection(("127.0.0.1", live_server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.perf_counter()
        sock.settimeout(10)
        answer = sock.recv(65536)
        waited = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert HEADER_TIMEOUT_S * 0.9 < waited < HEADER_TIMEOUT_S + 2


def test_a_silent_connection_is_closed_after_the_header_timeout(live_server):
    with socket.create_connection(("127.0.0.1", live_server.port)) as sock:
        sock.settimeout(10)
        started = time.perf_counter()
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.perf_counter() - started < HEADER_TIMEOUT_S + 2


def test_keep_alive_requests_after_the_first_are_not_timed_out(live_server):
    with httpx.Client(base_url=live_server.url, timeout=10) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(HEADER_TIMEOUT_S * 0.6)


def test_access_log_has_the_path_without_the_query_string(live_server):
    with httpx.Client(base_url=live_server.url, timeout=10) as client:
        assert client.get("/healthz", params={"token": "s3cr3t-in-query"}).status_code == 200
    def logged() -> str:
        text = live_server.log_path.read_text()
        return text if "GET /healthz HTTP/1.1" in text else ""

    log = wait_until(logged, 10, "the request's access log line")
    assert '"GET /healthz HTTP/1.1" 200' in log
    assert "s3cr3t-in-query" not in log and "/healthz?" not in log


def test_state_files_are_private_to_the_servers_user(live_server):
    with live_server.client() as client:  # a write, so the WAL files exist
        assert client.post("/v1/jobs", json={"algorithm": {"name": "maml"},
                                             "task_family": {"name": "sine"}}).status_code == 201
    state = live_server.cwd / ".metaserve"
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in
             [state, state / "admin.key", state / "metaserve.db", state / "metaserve.db-wal",
              state / "metaserve.db-shm", state / "artifacts"]}
    assert modes == {".metaserve": "0o700", "admin.key": "0o600", "metaserve.db": "0o600",
                     "metaserve.db-wal": "0o600", "metaserve.db-shm": "0o600",
                     "artifacts": "0o700"}
