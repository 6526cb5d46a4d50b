"""``GET /v1/jobs/stream``: one stream of a user's job changes (created, status, progress),
read over a real HTTP connection (uvicorn in a thread) while jobs are driven through the
service layer as the dispatcher drives them; resumable by Last-Event-ID."""

from __future__ import annotations

import httpx

from metaserve.client import parse_sse
from metaserve.service import job_store
from metaserve.service.orm import JobStatus
from tests.helpers import WORKER, claim, finish
from tests.helpers import submit_over_http as submit


def test_the_list_stream_sends_new_jobs_status_changes_and_progress_of_the_users_jobs_only(
        live_url: str, sessions, alice_auth, bob_auth) -> None:  # noqa: ANN001
    with httpx.Client(base_url=live_url, headers=alice_auth, timeout=20) as http:
        before = submit(http, alice_auth)  # changed before the stream opened: not sent
        with http.stream("GET", "/v1/jobs/stream") as response:
            assert response.status_code == 200
            stream = parse_sse(response.iter_lines())
            job_id = submit(http, alice_auth)
            submit(http, bob_auth)  # another user's: not sent
            created = next(stream)
            assert (created.kind, created.data["id"], created.data["status"]) == (
                "created", job_id, "queued")
            assert created.data["message"].startswith("waiting for a dispatcher")
            claim(sessions)  # the older job first
            started = next(stream)
            assert (started.kind, started.data["id"], started.data["status"]) == (
                "status", before, "running")
            with sessions.begin() as session:
                job_store.add_metrics(session=session, job_id=before, rows=[(5, "loss", 0.25)])
                job_store.update_progress(session=session, job_id=before, worker_id=WORKER,
                                          progress={"iteration": 5, "total": 10})
            progress = next(stream)
            assert (progress.kind, progress.data["progress"], progress.data["latest_metrics"]) == (
                "progress", {"iteration": 5, "total": 10}, {"loss": 0.25})
            resume_at = progress.id
        finish(sessions, before, JobStatus.SUCCEEDED)
        # A reconnect with Last-Event-ID gets what happened while it was away.
        with http.stream("GET", "/v1/jobs/stream", headers={"Last-Event-ID": resume_at}) as again:
            done = next(parse_sse(again.iter_lines()))
        assert (done.data["id"], done.data["status"], done.id > resume_at) == (
            before, "succeeded", True)
        assert done.data["duration_s"] >= 0
        bad = http.get("/v1/jobs/stream", headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 422
        assert bad.json()["error"]["details"][0]["field"] == "last-event-id"
