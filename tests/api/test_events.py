"""``GET /v1/jobs/{id}/events`` on SQLite and PostgreSQL: the job is driven through the
service layer exactly as the dispatcher drives it, and the stream is read over a real HTTP
connection (uvicorn in a thread) while that happens."""

from __future__ import annotations

import contextlib
import time

import httpx
from fastapi.testclient import TestClient

from metaserve.service import events, job_store
from metaserve.service.orm import JobStatus
from metaserve.client import Event, parse_sse
from tests.helpers import WORKER, claim, finish
from tests.helpers import submit_over_http as submit


def add_step(sessions, job_id: str, step: int) -> None:  # noqa: ANN001
    with sessions() as session:
        with session.begin():
            job_store.add_metrics(session=session, job_id=job_id,
                                  rows=[(step, "train/loss_after", step / 10), (step, "train/loss_before", 1.0)])
        with session.begin():
            job_store.update_progress(session=session, job_id=job_id, worker_id=WORKER,
                                      progress={"iteration": step, "total": 30}, message="")


def summary(events: list[Event]) -> list[tuple[str, str, object]]:
    """``(id, kind, what)`` with ``what`` the status, metric step or progress iteration."""
    what = {"status": lambda d: (d["status"], d["attempt"]), "metrics": lambda d: d["step"],
            "progress": lambda d: d["iteration"]}
    return [(event.id, event.kind, what[event.kind](event.data)) for event in events]


def read_stream(client: TestClient, job_id: str, auth: dict[str, str], **headers: str) -> list[Event]:
    response = client.get(f"/v1/jobs/{job_id}/events", headers={**auth, **headers})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return list(parse_sse(iter(response.text.split("\n"))))


def test_a_finished_job_streams_every_status_change_its_metrics_and_progress_then_closes(
        client: TestClient, sessions, alice_auth) -> None:  # noqa: ANN001
    job_id = submit(client, alice_auth)
    claim(sessions)
    add_step(sessions, job_id, 10)
    add_step(sessions, job_id, 20)
    finish(sessions, job_id, JobStatus.SUCCEEDED)

    events = read_stream(client, job_id, alice_auth)

    metric_ids = [int(event.id.split("-")[1]) for event in events if event.kind == "metrics"]
    first, second = metric_ids
    assert summary(events) == [
        ("1-0-0", "status", ("queued", 0)),
        ("2-0-0", "status", ("running", 1)),
        (f"2-{first}-0", "metrics", 10),
        (f"2-{second}-0", "metrics", 20),
        (f"2-{second}-20", "progress", 20),
        (f"3-{second}-20", "status", ("succeeded", 1)),
    ]
    assert events[2].data == {"step": 10, "values": {"train/loss_after": 1.0, "train/loss_before": 1.0}}
    assert events[4].data == {"iteration": 20, "total": 30}
    assert events[5].data == {"status": "succeeded", "attempt": 1, "message": "", "error": None}


def test_a_retried_job_streams_each_attempt_and_a_late_reader_sees_the_same_history(
        live_url: str, client: TestClient, sessions, alice_auth) -> None:  # noqa: ANN001
    with httpx.Client(base_url=live_url, headers=alice_auth, timeout=10) as http:
        job_id = submit(http, alice_auth)
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            stream = parse_sse(response.iter_lines())
            live = [next(stream)]
            claim(sessions)
            live.append(next(stream))
            with sessions.begin() as session:
                job_store.fail_attempt(session=session, job_id=job_id, worker_id=WORKER, error="boom")
            live.append(next(stream))
            claim(sessions)
            live.append(next(stream))
        finish(sessions, job_id, JobStatus.FAILED)
        resumed = read_stream(client, job_id, alice_auth, **{"Last-Event-ID": live[-1].id})

    late = read_stream(client, job_id, alice_auth)

    history = [
        ("1-0-0", "status", ("queued", 0)), ("2-0-0", "status", ("running", 1)),
        ("3-0-0", "status", ("queued", 1)), ("4-0-0", "status", ("running", 2)),
        ("5-0-0", "status", ("failed", 2))]
    assert summary(live + resumed) == history
    assert live[2].data["message"] == "attempt failed, will retry: boom"
    # the status history is stored with each change: a late reader misses nothing either
    assert summary(late) == history
    assert late[-1].data["error"] == "boom"


def test_the_live_stream_delivers_each_change_as_it_happens_and_resumes_from_last_event_id(
        live_url: str, sessions, alice_auth) -> None:  # noqa: ANN001
    """Each change is made only after the stream delivered the previous one; then the client
    disconnects, the job moves on, and a reconnect with Last-Event-ID delivers exactly the
    events it missed."""
    with httpx.Client(base_url=live_url, headers=alice_auth, timeout=10) as http:
        job_id = submit(http, alice_auth)
        received: list[Event] = []
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            stream = parse_sse(response.iter_lines())
            received.append(next(stream))                       # queued
            claim(sessions)
            received.append(next(stream))                       # running
            add_step(sessions, job_id, 10)
            received.extend([next(stream), next(stream)])       # metrics 10, progress 10
            with sessions.begin() as session:
                job_store.request_cancel(session=session, job_id=job_id, owner=_owner(session, alice_auth))
            received.append(next(stream))                       # cancelling
        add_step(sessions, job_id, 20)                          # while nobody listens
        finish(sessions, job_id, JobStatus.CANCELLED)
        with http.stream("GET", f"/v1/jobs/{job_id}/events",
                         headers={"Last-Event-ID": received[-1].id}) as response:
            resumed = list(parse_sse(response.iter_lines()))    # ends: the job is terminal

    ids = [event.id for event in received + resumed]
    assert [(kind, what) for _, kind, what in summary(received + resumed)] == [
        ("status", ("queued", 0)), ("status", ("running", 1)), ("metrics", 10), ("progress", 10),
        ("status", ("cancelling", 1)), ("metrics", 20), ("progress", 20),
        ("status", ("cancelled", 1))]
    assert len(set(ids)) == len(ids)
    cursors = [tuple(int(part) for part in event_id.split("-")) for event_id in ids]
    assert all(all(a <= b for a, b in zip(earlier, later)) and earlier != later
               for earlier, later in zip(cursors, cursors[1:]))


def test_the_streams_of_one_job_share_its_probe_and_each_read(
        live_url: str, sessions, alice_auth, monkeypatch) -> None:  # noqa: ANN001
    """Ten open streams on a running job read its events once each when they open, then once
    together to see that nothing more is there and once when the watch first sees the job, and
    no more while it does not move (one poll
    per stream every 0.25 s would be ~40 reads in that second); one change is one shared read."""
    reads: list[str] = []
    real_poll = events.poll_job_events
    monkeypatch.setattr(events, "poll_job_events",
                        lambda **kwargs: (reads.append(str(kwargs["after"])), real_poll(**kwargs))[1])
    streams = 10
    with httpx.Client(base_url=live_url, headers=alice_auth, timeout=10) as http, \
            contextlib.ExitStack() as open_streams:
        job_id = submit(http, alice_auth)
        claim(sessions)
        readers = [parse_sse(open_streams.enter_context(
            http.stream("GET", f"/v1/jobs/{job_id}/events")).iter_lines()) for _ in range(streams)]
        first = [(next(reader), next(reader)) for reader in readers]
        time.sleep(1.0)
        quiet_reads = len(reads)
        add_step(sessions, job_id, 10)
        after_change = [(next(reader), next(reader)) for reader in readers]

    assert {(a.data["status"], b.data["status"]) for a, b in first} == {("queued", "running")}
    # + the shared re-reads (one empty, one at the first probe) and, under load, a stream that
    # opened after the first probe read it again: a few, never one per stream per poll (~40)
    assert streams <= quiet_reads <= streams + 5
    assert len(reads) - quiet_reads <= 2  # metrics and progress may land in two probes
    assert {(a.kind, b.kind, a.data["step"], b.data["iteration"]) for a, b in after_change} == {
        ("metrics", "progress", 10, 10)}


def test_a_stream_reads_on_past_the_read_bound_until_it_has_every_event(
        live_url: str, sessions, alice_auth, monkeypatch) -> None:  # noqa: ANN001
    """A finished job's history larger than one read (MAX_METRIC_ROWS_PER_POLL rows) comes
    whole, without waiting for the job to move (it never will), then the terminal event."""
    monkeypatch.setattr(events, "MAX_METRIC_ROWS_PER_POLL", 6)  # 3 steps of 2 values a read
    with httpx.Client(base_url=live_url, headers=alice_auth, timeout=10) as http:
        job_id = submit(http, alice_auth)
        claim(sessions)
        for step in range(1, 11):
            add_step(sessions, job_id, step)
        finish(sessions, job_id, JobStatus.SUCCEEDED)
        began = time.monotonic()
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            received = list(parse_sse(response.iter_lines()))
    assert time.monotonic() - began < 5
    assert [what for _, kind, what in summary(received) if kind == "metrics"] == list(range(1, 11))
    assert summary(received)[-1][1:] == ("status", ("succeeded", 1))


def _owner(session, auth: dict[str, str]):  # noqa: ANN001, ANN202
    from metaserve.service import auth as service_auth

    return service_auth.authenticate(session=session, key=auth["Authorization"].split()[1])


def test_an_invalid_last_event_id_is_a_422_naming_the_header(
        client: TestClient, alice_auth) -> None:  # noqa: ANN001
    job_id = submit(client, alice_auth)
    response = client.get(f"/v1/jobs/{job_id}/events", headers={**alice_auth, "Last-Event-ID": "x"})
    assert response.status_code == 422
    assert response.json()["error"]["details"] == [{"field": "last-event-id", "message": "x"}]


def test_another_users_job_has_no_event_stream(client: TestClient, alice_auth, bob_auth) -> None:  # noqa: ANN001
    job_id = submit(client, alice_auth)
    response = client.get(f"/v1/jobs/{job_id}/events", headers=bob_auth)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
