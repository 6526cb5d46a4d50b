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


def readme_client_variables() -> set[str]:
    """The variables of the README's client table (the server's settings are in the generated
    docs/SETTINGS.md, checked by tests/test_generated_docs.py)."""
    settings = README.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `METASERVE_([A-Z0-9_]+)`", settings, re.M))


def test_readme_client_table_lists_the_client_and_test_variables():
    assert readme_client_variables() == {"URL", "API_KEY", "CONFIG", "TEST_DATABASE_URL"}


def test_the_readme_client_table_lists_every_variable_the_sdk_reads():
    from metaserve import client

    source = "".join(path.read_text() for path in Path(client.__file__).parent.glob("*.py"))
    read = set(re.findall(r"os\.environ(?:\.get)?[(\[]\"METASERVE_([A-Z0-9_]+)\"", source))
    assert read == {"URL", "API_KEY", "CONFIG"}
    assert read < readme_client_variables()
