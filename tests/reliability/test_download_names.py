"""``Client.download`` refuses artifact names (as a server lists them) that would leave the
target directory, before it requests or writes anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaserve.client import Client, MetaserveClientError, safe_target

HOSTILE = ["../escape", "a/../../escape", "/etc/passwd", "..", ".", "a//b", "a\\..\\b",
           "C:evil", "link/x", "x\x00y", ""]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_name_leaving_the_directory_is_refused(tmp_path, name):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)  # a link out of it
    with pytest.raises(MetaserveClientError, match="refusing artifact name"):
        safe_target(tmp_path / "out", name)


@pytest.mark.parametrize("name", ["meta_init.json", "checkpoint/checkpoint.safetensors"])
def test_a_plain_name_stays_inside(tmp_path, name):
    assert safe_target(tmp_path, name) == tmp_path / name


def test_download_refuses_before_any_request_or_write(tmp_path, monkeypatch):
    client = Client(url="http://127.0.0.1:9", api_key="ms_test")
    monkeypatch.setattr(client, "artifacts", lambda _job: [{"name": "meta_init.json"},
                                                           {"name": "../../owned"}])
    requested = []
    monkeypatch.setattr(client._http, "stream", lambda *a, **k: requested.append(a))
    with pytest.raises(MetaserveClientError, match="refusing artifact name '../../owned'"):
        client.download("01JOB", tmp_path / "out", names=None)
    assert requested == []
    assert not (tmp_path / "owned").exists() and not Path(tmp_path.parent / "owned").exists()
