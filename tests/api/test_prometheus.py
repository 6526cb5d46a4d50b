"""``GET /metrics`` (Prometheus) on SQLite and PostgreSQL: who may scrape, request metrics by
route template, the database gauges, and the dispatcher's lease counters."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from metaserve.api.app import create_app
from metaserve.service import job_runs, job_store, telemetry
from metaserve.service.dispatcher import Dispatcher, _Running
from metaserve.service.orm import Job
from metaserve.service.settings import Settings
from tests.helpers import WORKER, claim
from tests.helpers import submit_over_http as submit


def scrape(client: TestClient, auth: dict[str, str]) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers=auth)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def test_only_an_admin_key_may_scrape_unless_anonymous_scrapes_are_allowed(
        client: TestClient, alice_auth, admin_auth, db_url: str, engine) -> None:  # noqa: ANN001
    assert client.get("/metrics").status_code == 401
    response = client.get("/metrics", headers=alice_auth)
    assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden")
    assert client.get("/metrics", headers=admin_auth).status_code == 200
    anonymous = Settings(database_url=db_url, dispatcher=False, metrics_anonymous=True)
    with TestClient(create_app(anonymous)) as open_client:
        assert open_client.get("/metrics").status_code == 200


def test_requests_are_counted_and_timed_by_route_template_and_status(
        client: TestClient, alice_auth, admin_auth) -> None:  # noqa: ANN001
    job_id = submit(client, alice_auth)
    for _ in range(3):
        assert client.get(f"/v1/jobs/{job_id}", headers=alice_auth).status_code == 200
    assert client.get("/v1/jobs/nope", headers=alice_auth).status_code == 404
    assert client.get("/no/such/path/42").status_code == 404
    metrics = scrape(client, admin_auth)
    count = "metaserve_http_requests_total"
    route = (("method", "GET"), ("route", "/v1/jobs/{job_id}"))
    assert metrics[(count, (*route, ("status", "200")))] == 3
    assert metrics[(count, (*route, ("status", "404")))] == 1
    assert metrics[(count, (("method", "POST"), ("route", "/v1/jobs"), ("status", "201")))] == 1
    assert metrics[(count, (("method", "GET"), ("route", "<unmatched>"), ("status", "404")))] == 1
    assert not any("/no/such/path" in str(labels) for _, labels in metrics)
    histogram = "metaserve_http_request_duration_seconds"
    assert metrics[(f"{histogram}_count", (*route, ("status", "200")))] == 3
    infinite = metrics[(f"{histogram}_bucket", (("le", "+Inf"), *route, ("status", "200")))]
    assert infinite == 3
    buckets = [metrics[(f"{histogram}_bucket", (("le", repr(float(b)) if b < 1 else f"{b:.1f}"),
                                                *route, ("status", "200")))]
               for b in telemetry.LATENCY_BUCKETS_S]
    assert buckets == sorted(buckets) and buckets[-1] == 3


def test_jobs_by_status_queue_depth_oldest_age_and_running_tasks_per_second(
        client: TestClient, sessions, alice_auth, admin_auth) -> None:  # noqa: ANN001
    running_id = submit(client, alice_auth)
    rl_id = submit(client, alice_auth)
    submit(client, alice_auth)
    assert (claim(sessions), claim(sessions)) == (running_id, rl_id)
    with sessions() as session:
        with session.begin():
            job_store.update_progress(session=session, job_id=running_id, worker_id=WORKER,
                                      progress={"iteration": 5, "total": 30, "tasks_per_s": 123.5},
                                      message="")
        with session.begin():
            job_store.update_progress(session=session, job_id=rl_id, worker_id=WORKER, message="",
                                      progress={"iteration": 2, "total": 9, "env_steps_per_s": 4321.0})
    time.sleep(0.05)
    metrics = scrape(client, admin_auth)
    assert {status: metrics[("metaserve_jobs", (("status", status),))]
            for status in ("queued", "running", "succeeded", "failed")} == {
        "queued": 1, "running": 2, "succeeded": 0, "failed": 0}
    assert metrics[("metaserve_queue_depth", ())] == 1
    assert 0.0 < metrics[("metaserve_queue_oldest_age_seconds", ())] < 60
    assert metrics[("metaserve_running_job_tasks_per_second",
                    (("job_id", running_id), ("name", "maml-sine")))] == 123.5
    assert metrics[("metaserve_running_tasks_per_second", ())] == 123.5
    assert metrics[("metaserve_running_job_env_steps_per_second",
                    (("job_id", rl_id), ("name", "maml-sine")))] == 4321.0
    assert metrics[("metaserve_dispatcher_connected", ())] == 0  # none in this app
    assert metrics[("metaserve_database_up", ())] == 1


def test_the_dispatcher_counts_lease_renewals(client: TestClient, sessions, alice_auth,
                                              admin_auth, db_url: str) -> None:  # noqa: ANN001
    """The lease keeper renews the leases of the running jobs every heartbeat_s; each
    renewal is counted (no Ray needed: only the keeper runs, the job's thread idles)."""
    job_id = submit(client, alice_auth)
    settings = Settings(database_url=db_url, heartbeat_s=0.01, dispatcher=False)
    dispatcher = Dispatcher(settings, sessions, worker_id=WORKER)
    assert claim(sessions) == job_id
    before = scrape(client, admin_auth)[("metaserve_lease_renewals_total", ())]
    done = threading.Event()
    with sessions() as session:
        run = job_runs.job_run(session=session, job=session.get(Job, job_id), settings=settings)
    job_thread = threading.Thread(target=done.wait)
    job_thread.start()
    dispatcher._running[job_id] = _Running(run=run, thread=job_thread)
    keeper = threading.Thread(target=dispatcher._keep_leases)
    keeper.start()
    time.sleep(2.3)  # the keeper wakes every WATCH_S = 1 s
    dispatcher._stop.set()
    done.set()
    keeper.join()
    after = scrape(client, admin_auth)[("metaserve_lease_renewals_total", ())]
    assert after - before == pytest.approx(2, abs=1)


# --------------------------------------------------------------------------- what a request's time spans


def _timed(app, scope_extra: dict | None = None, body_chunks: list[tuple[float, bytes]] = ()) -> float:  # noqa: ANN001
    """Run one request through MetricsMiddleware around the ASGI ``app``; the seconds it
    observed for it (the histogram's sum)."""
    from metaserve.api.routes.prometheus import MetricsMiddleware

    metrics = telemetry.Telemetry(sessions=None, dispatcher_connected=lambda: False)  # type: ignore[arg-type]
    pending = list(body_chunks)

    async def receive() -> dict:
        if not pending:
            return {"type": "http.request", "body": b"", "more_body": False}
        delay, chunk = pending.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        pass

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], **(scope_extra or {})}
    asyncio.run(MetricsMiddleware(app, metrics)(scope, receive, send))
    return metrics.http.latency.labels("GET", "<unmatched>", "200")._sum.get()


async def _slow_body(scope, receive, send) -> None:  # noqa: ANN001 - an ASGI app
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")]})
    for _ in range(3):
        await asyncio.sleep(0.1)
        await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _event_stream(scope, receive, send) -> None:  # noqa: ANN001 - an ASGI app
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
    await asyncio.sleep(0.3)
    await send({"type": "http.response.body", "body": b"data: 1\n\n"})


async def _read_body_then_answer(scope, receive, send) -> None:  # noqa: ANN001 - an ASGI app
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_request_is_timed_to_its_last_response_byte_an_event_stream_to_its_head() -> None:
    assert 0.3 <= _timed(_slow_body) < 1.0  # the streamed body counts, not only the head
    assert _timed(_event_stream) < 0.2  # a stream's length is its job's, not a latency


def test_a_request_is_timed_from_its_first_byte_read_its_body_included() -> None:
    assert 0.3 <= _timed(_read_body_then_answer, body_chunks=[(0.15, b"a"), (0.15, b"b")]) < 1.0
    # metaserve serve's protocol stamps when the head's first bytes were read
    read_earlier = {"extensions": {telemetry.RECEIVED_AT: time.perf_counter() - 0.4}}
    assert 0.4 <= _timed(_read_body_then_answer, read_earlier) < 1.0


def test_answers_before_routing_are_labelled_with_the_route_their_path_matches(
        client: TestClient, alice_auth, admin_auth) -> None:  # noqa: ANN001
    too_large = client.post("/v1/jobs", content=b"{" + b" " * 20_000 + b"}",
                            headers={**alice_auth, "content-type": "application/json"})
    assert too_large.status_code == 413
    assert client.get("/v1/jobs/a%01b", headers=alice_auth).status_code == 422
    metrics = scrape(client, admin_auth)
    count = "metaserve_http_requests_total"
    assert metrics[(count, (("method", "POST"), ("route", "/v1/jobs"), ("status", "413")))] == 1
    assert metrics[(count, (("method", "GET"), ("route", "/v1/jobs/{job_id}"),
                            ("status", "422")))] == 1


def test_event_loop_stalls_and_full_collections_are_measured(db_url: str, engine,  # noqa: ANN001
                                                            sessions) -> None:  # noqa: ANN001
    from metaserve.service import auth

    with sessions() as session:
        _, key = auth.create_key(session=session, name="root", is_admin=True)
    app = create_app(Settings(database_url=db_url, dispatcher=False, metrics_anonymous=True))

    @app.get("/stall")
    async def stall() -> dict:
        time.sleep(0.3)  # a callback that does not yield: the loop stops
        return {}

    with TestClient(app) as test_client:
        time.sleep(0.2)  # the probe runs
        before = scrape(test_client, {})
        assert test_client.get("/stall").status_code == 200
        time.sleep(0.1)
        stalled = scrape(test_client, {})
        gc.collect()
        after = scrape(test_client, {})
    lag = "metaserve_event_loop_lag_seconds_bucket"
    late = {le: stalled[(lag, (("le", le),))] - before[(lag, (("le", le),))]
            for le in ("0.25", "+Inf")}
    assert late["+Inf"] - late["0.25"] >= 1  # a probe woke 0.25-0.3 s late
    full = ("metaserve_gc_pause_seconds_count", (("generation", "2"),))
    assert after[full] - before[full] >= 1
    assert after[("metaserve_gc_frozen_objects", ())] == 0  # only metaserve serve freezes


@pytest.mark.server
def test_metaserve_serve_times_a_request_from_the_first_byte_it_read(tmp_path) -> None:  # noqa: ANN001
    """The head sent in two parts 0.6 s apart: the application is called only once it is
    complete, the histogram counts from the first part."""
    import socket

    from tests.server_process import ServerProcess

    server = ServerProcess(tmp_path, METASERVE_DISPATCHER="false",
                           METASERVE_METRICS_ANONYMOUS="true").start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.6)
            sock.sendall(b"Connection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401")
        with server.client() as client:
            response = client.get("/metrics")
        metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(response.text)
                   for s in family.samples}
        series = (("method", "GET"), ("route", "/v1/jobs"), ("status", "401"))
        histogram = "metaserve_http_request_duration_seconds"
        assert metrics[(f"{histogram}_count", series)] == 1
        assert metrics[(f"{histogram}_bucket", (("le", "0.5"), *series))] == 0
        assert 0.6 <= metrics[(f"{histogram}_sum", series)] < 5
    finally:
        server.terminate()
