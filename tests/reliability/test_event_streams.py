"""SSE streams: one resumed at or after the job's terminal event closes at once; a user holds
at most METASERVE_MAX_EVENT_STREAMS_PER_USER open streams (more: 429 + Retry-After)."""

from __future__ import annotations

import time

import pytest

from metaserve.api.routes.events import STREAM_RETRY_AFTER_S, stream_slots
from tests.helpers import TWO_LINE_SPEC, bearer


def event_ids(text: str) -> list[str]:
    return [line.removeprefix("id: ") for line in text.splitlines() if line.startswith("id: ")]


@pytest.mark.timeout(60)
def test_stream_resumed_at_the_terminal_event_closes_at_once(client, alice_job, alice_key):
    full = client.get(f"/v1/jobs/{alice_job}/events", headers=bearer(alice_key))
    assert full.status_code == 200
    last = event_ids(full.text)[-1]
    assert 'event: status\ndata: {"status": "cancelled"' in full.text
    for resume in ({"headers": {**bearer(alice_key), "Last-Event-ID": last}},
                   {"headers": bearer(alice_key), "params": {"after": last}}):
        started = time.monotonic()
        response = client.get(f"/v1/jobs/{alice_job}/events", **resume)
        assert (response.status_code, response.text) == (200, "retry: 1000\n\n")
        assert time.monotonic() - started < 2.0


@pytest.mark.timeout(60)
def test_stream_resumed_after_the_terminal_event_closes_at_once(client, alice_job, alice_key):
    """A cursor past every event (a client's own counter, or one from a restored database)."""
    response = client.get(f"/v1/jobs/{alice_job}/events", params={"after": "999999-999999-0"},
                          headers=bearer(alice_key))
    assert (response.status_code, response.text) == (200, "retry: 1000\n\n")


def test_streams_beyond_the_per_user_cap_are_429_with_retry_after(client, alice_job,
                                                                 alice_key, bob_key):
    settings = client.app.state.settings
    slots = stream_slots(_request_of(client))
    alice_id = _user_id(client, alice_key)
    for _ in range(settings.max_event_streams_per_user):  # streams held open elsewhere
        assert slots.acquire(alice_id)
    refused = client.get(f"/v1/jobs/{alice_job}/events", headers=bearer(alice_key))
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == str(STREAM_RETRY_AFTER_S)
    assert refused.json()["error"]["code"] == "too_many_requests"
    # another user is not affected; one stream closed gives alice room again
    bob_job = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=bearer(bob_key)).json()["id"]
    client.post(f"/v1/jobs/{bob_job}/cancel", headers=bearer(bob_key))
    assert client.get(f"/v1/jobs/{bob_job}/events", headers=bearer(bob_key)).status_code == 200
    slots.release(alice_id)
    assert client.get(f"/v1/jobs/{alice_job}/events", headers=bearer(alice_key)).status_code == 200
    assert slots.open_streams(alice_id) == settings.max_event_streams_per_user - 1


def test_a_finished_stream_gives_its_slot_back(client, alice_job, alice_key):
    for _ in range(client.app.state.settings.max_event_streams_per_user + 3):
        assert client.get(f"/v1/jobs/{alice_job}/events",
                          headers=bearer(alice_key)).status_code == 200
    assert client.app.state.event_stream_slots._open == {}


def _request_of(client):  # noqa: ANN001, ANN202
    class _Request:
        app = client.app
    return _Request()


def _user_id(client, key: str) -> int:  # noqa: ANN001
    from metaserve.service import auth

    with client.app.state.session_factory() as session:
        return auth.authenticate(session=session, key=key).id
