from __future__ import annotations

import re
from pathlib import Path

from metaserve.service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_settings_read_the_metaserve_prefix(monkeypatch):
    monkeypatch.setenv("METASERVE_PORT", "9001")
    monkeypatch.setenv("METASERVE_DISPATCHER", "false")
    monkeypatch.setenv("METASERVE_DATABASE_URL", "sqlite:///x.db")
    settings = Settings()
    assert (settings.port, settings.dispatcher, settings.database_url) == (9001, False,
                                                                           "sqlite:///x.db")


def test_defaults_are_the_embedded_default(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(f"METASERVE_{name.upper()}", raising=False)
    settings = Settings()
    assert (settings.host, settings.port, settings.database_url, str(settings.artifact_root),
            settings.ray_address, settings.max_body_bytes) == (
        "127.0.0.1", 8000, "sqlite:///./.metaserve/metaserve.db", ".metaserve/artifacts", "",
        1024 * 1024)


def test_readme_settings_table_lists_every_setting():
    documented = set(re.findall(r"^\| `METASERVE_([A-Z0-9_]+)`", README.read_text(), re.M))
    assert documented - {"TEST_DATABASE_URL"} == {name.upper() for name in Settings.model_fields}
