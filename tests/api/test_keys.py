"""API keys: ``GET /v1/keys`` and ``DELETE /v1/keys/{id}`` (admin only), ``metaserve keys
list|revoke|rotate``; a revoked key is refused at once by the server that revoked it and within
the key cache's TTL by another."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from metaserve.api.app import create_app
from metaserve.service import auth
from metaserve.cli import app as cli
from metaserve.service.settings import Settings

SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}


def key_id(sessions, headers: dict[str, str]) -> int:  # noqa: ANN001
    with sessions() as session:
        return auth.authenticate(session=session,
                                 key=headers["Authorization"].removeprefix("Bearer ")).id


def test_admin_lists_keys_without_secrets_and_others_are_403(client, admin_auth, alice_auth):
    listed = client.get("/v1/keys", headers=admin_auth)
    assert listed.status_code == 200
    assert [(k["name"], k["is_admin"], k["revoked"]) for k in listed.json()["data"]] == [
        ("root", True, False), ("alice", False, False)]
    assert "key_hash" not in listed.text and "ms_" not in listed.text
    refused = client.get("/v1/keys", headers=alice_auth)
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "forbidden")
    assert client.delete("/v1/keys/1", headers=alice_auth).status_code == 403


def test_revoked_key_is_refused_at_once_by_the_revoking_server_and_its_jobs_stay(
        client, sessions, admin_auth, alice_auth):  # noqa: ANN001
    job_id = client.post("/v1/jobs", json=SPEC, headers=alice_auth).json()["id"]
    assert client.get("/v1/jobs", headers=alice_auth).status_code == 200  # now in the cache
    alice_id = key_id(sessions, alice_auth)
    revoked = client.delete(f"/v1/keys/{alice_id}", headers=admin_auth)
    assert revoked.status_code == 200
    assert (revoked.json()["name"], revoked.json()["revoked"]) == ("alice", True)
    assert client.get("/v1/jobs", headers=alice_auth).status_code == 401
    assert client.get(f"/v1/jobs/{job_id}", headers=admin_auth).status_code == 200
    assert client.delete(f"/v1/keys/{alice_id}", headers=admin_auth).status_code == 200  # again
    assert client.delete("/v1/keys/9999", headers=admin_auth).status_code == 404


def test_another_server_refuses_a_revoked_key_once_its_cache_entry_expires(
        client, db_url, artifact_root, sessions, admin_auth, alice_auth):  # noqa: ANN001
    other_app = create_app(Settings(database_url=db_url, dispatcher=False,
                                    artifact_root=artifact_root))
    other_app.state.key_cache = auth.KeyCache(ttl_s=1.0)
    with TestClient(other_app) as other:
        assert other.get("/v1/jobs", headers=alice_auth).status_code == 200  # cached there
        client.delete(f"/v1/keys/{key_id(sessions, alice_auth)}", headers=admin_auth)
        assert client.get("/v1/jobs", headers=alice_auth).status_code == 401
        assert other.get("/v1/jobs", headers=alice_auth).status_code == 200  # within its TTL
        time.sleep(1.1)
        assert other.get("/v1/jobs", headers=alice_auth).status_code == 401


def test_cli_lists_revokes_and_rotates_keys(client, db_url, sessions, admin_auth, alice_auth):  # noqa: ANN001
    runner = CliRunner()
    alice_id = key_id(sessions, alice_auth)
    listed = runner.invoke(cli, ["keys", "list", "--database-url", db_url])
    assert listed.exit_code == 0, listed.output
    assert [line.split()[:4] for line in listed.output.splitlines()[1:]] == [
        ["1", "root", "yes", "no"], [str(alice_id), "alice", "no", "no"]]

    rotated = runner.invoke(cli, ["keys", "rotate", str(alice_id), "--database-url", db_url])
    assert rotated.exit_code == 0, rotated.output
    new_key = rotated.output.strip()
    assert new_key.startswith("ms_") and new_key not in alice_auth["Authorization"]
    other = create_app(Settings(database_url=db_url, dispatcher=False))
    with TestClient(other) as fresh:  # a server that has not cached the old key
        assert fresh.get("/v1/jobs", headers=alice_auth).status_code == 401
        assert fresh.get("/v1/jobs", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200

        revoked = runner.invoke(cli, ["keys", "revoke", str(alice_id), "--database-url", db_url])
        assert (revoked.exit_code, revoked.output) == (0, f"revoked key {alice_id} (alice)\n")
        other.state.key_cache = auth.KeyCache()
        assert fresh.get("/v1/jobs", headers={"Authorization": f"Bearer {new_key}"}).status_code == 401
    assert runner.invoke(cli, ["keys", "list", "--database-url", db_url]).output.splitlines()[2].split()[3] == "yes"
    missing = runner.invoke(cli, ["keys", "revoke", "999", "--database-url", db_url])
    assert (missing.exit_code, missing.output) == (1, "error: no API key with id 999\n")
