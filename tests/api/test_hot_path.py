"""The status poll's hot path: the in-process key cache (a poll with a known key costs no
authentication query, a wrong key is never cached, entries expire, the cache stays bounded)
and the start-up garbage-collector freeze of `metaserve serve`."""

from __future__ import annotations

import time

from sqlalchemy import event

from metaserve.service.auth import KeyCache, hash_key
from metaserve.service.orm import User

SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}


def _statements(client):  # noqa: ANN001, ANN202
    seen: list[str] = []
    engine = client.app.state.engine
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *args: seen.append(statement))
    return seen


def test_known_key_is_checked_once_then_served_from_the_cache(client, alice_auth) -> None:  # noqa: ANN001
    job_id = client.post("/v1/jobs", json=SPEC, headers=alice_auth).json()["id"]
    seen = _statements(client)
    for _ in range(3):
        assert client.get(f"/v1/jobs/{job_id}", headers=alice_auth).status_code == 200
    assert not [s for s in seen if "FROM users" in s]
    # Each poll: the job's row, its status history, its latest metric values, its sweep (a
    # driver's trial count) — four indexed reads, none of them of the key.
    assert len(seen) == 3 * 4
    assert len([s for s in seen if "FROM job_status_events" in s]) == 3


def test_wrong_key_is_never_cached(client, alice_auth) -> None:  # noqa: ANN001
    seen = _statements(client)
    wrong = {"Authorization": "Bearer ms_not-a-key"}
    for _ in range(2):
        assert client.get("/v1/jobs", headers=wrong).status_code == 401
    assert len([s for s in seen if "FROM users" in s]) == 2
    assert len(client.app.state.key_cache._entries) == 0


def test_cached_user_is_a_transient_copy() -> None:
    cache = KeyCache()
    original = User(id=7, name="alice", is_admin=False, key_hash=hash_key("k"))
    copy = cache.put(hash_key("k"), original)
    assert copy is not original and (copy.id, copy.name, copy.is_admin) == (7, "alice", False)
    assert copy.key_hash is None  # the hash is not kept beside it
    assert cache.get(hash_key("k")) is copy and cache.get(hash_key("other")) is None


def test_entries_expire_and_the_least_recently_used_goes_first() -> None:
    cache = KeyCache(ttl_s=0.05, size=2)
    for name in ("a", "b"):
        cache.put(name, User(id=1, name=name, is_admin=False))
    assert cache.get("a") is not None  # a is now more recent than b
    cache.put("c", User(id=3, name="c", is_admin=False))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    time.sleep(0.06)
    assert cache.get("a") is None and cache.get("c") is None


def test_server_freezes_its_start_up_objects_only_when_asked(db_url, tmp_path) -> None:  # noqa: ANN001
    import gc

    from fastapi.testclient import TestClient

    from metaserve.api.app import create_app
    from metaserve.service.settings import Settings
    from metaserve.service.telemetry import GC_PAUSES

    settings = Settings(database_url=db_url, dispatcher=False, artifact_root=tmp_path)
    gc.unfreeze()
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/healthz").status_code == 200
            assert gc.get_freeze_count() == 0
        with TestClient(create_app(settings, freeze_gc=True)) as client:
            deadline = time.monotonic() + 10
            while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
                assert client.get("/healthz").status_code == 200
                time.sleep(0.05)
            assert gc.get_freeze_count() > 10_000
            # counted once at the freeze, not walked again at every /metrics scrape
            deadline = time.monotonic() + 10
            while GC_PAUSES.frozen_objects == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            # (frozen objects that are freed leave the count: it only drifts down, slowly)
            assert gc.get_freeze_count() <= GC_PAUSES.frozen_objects < 1.01 * gc.get_freeze_count()
            gauge = {family.name: family for family in GC_PAUSES.collect()}["metaserve_gc_frozen_objects"]
            assert gauge.samples[0].value == GC_PAUSES.frozen_objects
    finally:
        gc.unfreeze()  # this test process is not a server: let the collector see it all again
        GC_PAUSES.record_freeze()  # 0 again
