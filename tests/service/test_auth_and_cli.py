from __future__ import annotations

import stat

import pytest
from typer.testing import CliRunner

from metaserve.service import auth, job_store
from metaserve.cli import app
from metaserve.service.db import make_engine, session_factory
from metaserve.service.exceptions import Unauthorized
from metaserve.service.ids import new_id


def test_ids_are_26_chars_and_sort_in_creation_order():
    ids = [new_id() for _ in range(2000)]
    assert all(len(job_id) == 26 for job_id in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_keys_are_stored_only_as_their_sha256(session):
    user, key = auth.create_key(session=session, name="alice")
    assert key.startswith("ms_") and len(key) == 3 + 43
    assert user.key_hash == auth.hash_key(key) != key
    assert auth.authenticate(session=session, key=key).id == user.id
    with pytest.raises(Unauthorized):
        auth.authenticate(session=session, key=key + "x")


def test_admin_key_is_written_once_with_mode_0600(session, tmp_path):
    path = tmp_path / "state" / "admin.key"
    assert auth.ensure_admin_key(session=session, path=path) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    admin = auth.authenticate(session=session, key=path.read_text().strip())
    assert (admin.name, admin.is_admin) == ("admin", True)
    assert auth.ensure_admin_key(session=session, path=tmp_path / "other.key") is None
    assert job_store.count_users(session=session) == 1


def test_cli_db_upgrade_check_and_keys_create(db_url):
    runner = CliRunner()
    for command in (["db", "upgrade", "--database-url", db_url], ["db", "check", "--database-url", db_url]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["keys", "create", "carol", "--admin", "--database-url", db_url])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[-1]
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            user = auth.authenticate(session=session, key=key)
            assert (user.name, user.is_admin) == ("carol", True)
    finally:
        engine.dispose()
    assert runner.invoke(app, ["db", "downgrade", "--database-url", db_url]).exit_code == 0
