"""A key revoked or rotated out ends its open event streams (``/events``, ``/logs?follow=true``)
within 5 s with a last ``closed`` event saying why — also when it is revoked by another
process (``metaserve keys revoke`` writes the database; the server's key cache is not told).
Before, the streams stayed open until the job ended: up to the 7-day runtime limit."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from itertools import count

import httpx
import pytest
from sqlalchemy import Engine

from metaserve.service import auth
from metaserve.service.db import make_engine, session_factory
from tests.helpers import TWO_LINE_SPEC
from tests.server_process import ServerProcess

pytestmark = pytest.mark.server

ENDED_WITHIN_S = 5.0
_names = count()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Engine]]:
    server = ServerProcess(tmp_path_factory.mktemp("revocation"), METASERVE_DISPATCHER="false")
    server.start()
    engine = make_engine(f"sqlite:///{server.cwd / '.metaserve' / 'metaserve.db'}")
    yield server, engine
    engine.dispose()
    server.terminate()


def new_user_with_a_queued_job(server: ServerProcess, engine: Engine) -> tuple[int, str, str]:
    """(user id, key, job id): the job stays queued (no dispatcher), so its streams stay open."""
    with session_factory(engine)() as session:
        user, key = auth.create_key(session=session, name=f"streamer-{next(_names)}")
    response = httpx.post(f"{server.url}/v1/jobs", json=TWO_LINE_SPEC, timeout=30,
                          headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 201, response.text
    return user.id, key, response.json()["id"]


class StreamReader:
    """Reads an SSE stream in a thread: its events (name, data) and when it ended."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.events: list[tuple[str, str]] = []
        self.ended_at: float | None = None
        self.status_code: int | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        name = ""
        with httpx.stream("GET", self.url, headers={"Authorization": f"Bearer {self.key}"},
                          timeout=httpx.Timeout(30, read=20)) as response:
            self.status_code = response.status_code
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    self.events.append((name, line.removeprefix("data: ")))
        self.ended_at = time.monotonic()

    def start(self) -> "StreamReader":
        self.thread.start()
        deadline = time.monotonic() + 30
        while self.status_code is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.status_code == 200
        time.sleep(0.5)  # its first poll done
        return self


@pytest.mark.parametrize("stream", ["events", "logs?follow=true"])
@pytest.mark.parametrize(("action", "reason"), [
    ("revoke", "api_key_revoked"), ("rotate", "api_key_rotated")])
def test_a_key_revoked_or_rotated_elsewhere_ends_its_stream_within_5_s(live_server, stream,
                                                                       action, reason):
    server, engine = live_server
    user_id, key, job_id = new_user_with_a_queued_job(server, engine)
    reader = StreamReader(f"{server.url}/v1/jobs/{job_id}/{stream}", key).start()
    assert reader.ended_at is None
    with session_factory(engine)() as session:  # as `metaserve keys revoke|rotate` does
        if action == "revoke":
            auth.revoke_key(session=session, user_id=user_id)
        else:
            auth.rotate_key(session=session, user_id=user_id)
    ended_by = time.monotonic()
    reader.thread.join(timeout=20)
    assert reader.ended_at is not None, "the stream is still open"
    assert reader.ended_at - ended_by <= ENDED_WITHIN_S
    name, data = reader.events[-1]
    assert name == "closed"
    assert json.loads(data)["reason"] == reason
    # The stream's check told this server's key cache: the old key is refused at once.
    refused = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=30,
                        headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 401


def test_a_key_revoked_through_the_api_ends_its_stream_within_5_s(live_server):
    server, engine = live_server
    user_id, key, job_id = new_user_with_a_queued_job(server, engine)
    reader = StreamReader(f"{server.url}/v1/jobs/{job_id}/events", key).start()
    ended_by = time.monotonic()
    with server.client() as admin:
        assert admin.delete(f"/v1/keys/{user_id}").status_code == 200
    reader.thread.join(timeout=20)
    assert reader.ended_at is not None and reader.ended_at - ended_by <= ENDED_WITHIN_S
    assert reader.events[-1][0] == "closed"
    assert json.loads(reader.events[-1][1]) == {
        "reason": "api_key_revoked", "message": "the API key of this stream was revoked"}
