"""``GET /metrics`` (Prometheus) on SQLite and PostgreSQL: who may scrape, request metrics by
route template, the database gauges, and the dispatcher's lease counters."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from metaserve.api.app import create_app
from metaserve.service import jobs, telemetry
from metaserve.service.dispatcher import Dispatcher, _Running
from metaserve.service.settings import Settings
from tests.api.test_events import WORKER, claim, submit


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
        jobs.update_progress(session=session, job_id=running_id, worker_id=WORKER,
                             progress={"iteration": 5, "total": 30, "tasks_per_s": 123.5},
                             message="")
        jobs.update_progress(session=session, job_id=rl_id, worker_id=WORKER, message="",
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
    """The watch thread of a running job renews its lease every heartbeat_s; each renewal is
    counted (no Ray needed: only the watch runs)."""
    job_id = submit(client, alice_auth)
    settings = Settings(database_url=db_url, heartbeat_s=0.01, dispatcher=False)
    dispatcher = Dispatcher(settings, sessions, worker_id=WORKER)
    assert claim(sessions) == job_id
    before = scrape(client, admin_auth)[("metaserve_lease_renewals_total", ())]
    done = threading.Event()
    watch = threading.Thread(target=dispatcher._watch, args=(
        _Running(job_id=job_id, thread=threading.current_thread()), done))
    watch.start()
    time.sleep(2.3)  # the watch wakes every WATCH_S = 1 s
    done.set()
    watch.join()
    after = scrape(client, admin_auth)[("metaserve_lease_renewals_total", ())]
    assert after - before == pytest.approx(2, abs=1)
