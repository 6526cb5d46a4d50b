"""The CLI never writes a server-supplied control character to the terminal: job names,
messages and errors with escape sequences are printed escaped (``\\x1b[2J``), and rich markup
in a name is printed as text."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from metaserve.cli import app, user
from metaserve.cli.common import CONTROL_CHARACTERS, printable

HOSTILE = "evil\x1b[2J\x1b]0;pwned\x07\x9b31m[bold red]x[/]\r\n"
JOB = {"id": "01JOB", "name": HOSTILE, "status": "failed", "attempt": 1, "max_attempts": 3,
       "created_at": "2026-01-01T00:00:00Z", "progress": {}, "message": HOSTILE,
       "error": "Boom\x1b[31m", "started_at": None, "finished_at": None}


class FakeClient:
    def __enter__(self) -> "FakeClient":
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def list(self, **_: object) -> list[dict]:
        return [JOB]

    def list_page(self, **_: object) -> dict:
        return {"data": [JOB], "total": 1, "next_cursor": None}

    def get(self, _job: str) -> dict:
        return JOB

    def cancel(self, _job: str) -> dict:
        return {**JOB, "id": "01JOB\x1b[2J"}

    def metrics(self, _job: str) -> list[dict]:
        return [{"name": "train/\x1b[2Jloss", "step": 1, "value": 0.5}]


@pytest.fixture
def runner(monkeypatch) -> CliRunner:  # noqa: ANN001
    monkeypatch.setattr(user, "connect", lambda *a, **k: FakeClient())
    return CliRunner(env={"COLUMNS": "400"})


@pytest.mark.parametrize("command", [["list"], ["status", "01JOB"], ["cancel", "01JOB"],
                                     ["metrics", "01JOB"]])
def test_control_characters_from_the_server_are_printed_escaped(runner, command):
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert not CONTROL_CHARACTERS.search(result.output.replace("\n", "")), repr(result.output)
    assert "\\x1b[2J" in result.output


def test_rich_markup_in_a_name_is_printed_as_text(runner):
    output = runner.invoke(app, ["list"]).output
    assert "[bold red]x[/]" in output


def test_printable_escapes_c0_del_and_c1_and_keeps_unicode():
    assert printable("a\x00b\x1b[1m\x7f\x9b\tc – Ω 正") == "a\\x00b\\x1b[1m\\x7f\\x9b\\tc – Ω 正"
