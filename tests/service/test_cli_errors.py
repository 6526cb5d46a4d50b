"""Every user error of the ``metaserve`` command is one line on stderr and exit code 1: usage
errors, invalid YAML or specs, and admin commands run where there is no server database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metaserve.cli import app
from metaserve.service.settings import get_settings

METASERVE = str(Path(sys.executable).with_name("metaserve"))


@pytest.fixture
def empty_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with no server state; settings, config and keys from the environment gone."""
    for name in ("METASERVE_DATABASE_URL", "METASERVE_URL", "METASERVE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("METASERVE_CONFIG", str(tmp_path / "config.toml"))
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    get_settings.cache_clear()
    yield work
    get_settings.cache_clear()


def run_metaserve(arguments: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        app(arguments, prog_name="metaserve")
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_keys_create_in_an_empty_directory_names_the_database_it_looked_for(
        empty_directory: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "METASERVE_DATABASE_URL"}
    done = subprocess.run([METASERVE, "keys", "create", "x"], cwd=empty_directory, env=env,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "error: no metaserve database at sqlite:///./.metaserve/metaserve.db "
        f"({empty_directory / '.metaserve' / 'metaserve.db'} does not exist): run this in the "
        "directory where `metaserve serve` runs, or set METASERVE_DATABASE_URL or --database-url\n")
    assert list(empty_directory.iterdir()) == []  # no empty database created on the way


def test_keys_create_against_a_database_that_is_not_metaserves_says_so(
        empty_directory: Path, capsys: pytest.CaptureFixture) -> None:
    (empty_directory / "other.db").touch()
    code, out, err = run_metaserve(["keys", "create", "x", "--database-url", "sqlite:///other.db"], capsys)
    assert (code, out) == (1, "")
    assert err == ("error: sqlite:///other.db is not a metaserve database (it has no users "
                   "table): run this in the directory where `metaserve serve` runs, or set "
                   "METASERVE_DATABASE_URL or --database-url\n")


def test_an_unreachable_database_is_one_line_naming_it_without_its_password(
        empty_directory: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_metaserve(
        ["keys", "list", "--database-url", "postgresql+psycopg://postgres:secret@127.0.0.1:1/x"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith("error: database postgresql+psycopg://postgres:***@127.0.0.1:1/x: ")
    assert err.count("\n") == 1 and "secret" not in err


@pytest.mark.parametrize(("arguments", "message"), [
    (["submit", "--bogus", "spec.yaml"], "No such option: --bogus (see metaserve submit --help)"),
    (["status"], "Missing argument 'JOB'. (see metaserve status --help)"),
    (["list", "--limit", "0"], "Invalid value for '--limit': Input should be greater than or "
                               "equal to 1 (see metaserve list --help)"),
    (["frobnicate"], "No such command 'frobnicate'. (see metaserve --help)"),
])
def test_a_usage_error_is_one_line_and_exit_code_1(
        arguments: list[str], message: str, empty_directory: Path,
        capsys: pytest.CaptureFixture) -> None:
    assert run_metaserve(arguments, capsys) == (1, "", f"error: {message}\n")


def test_metaserve_alone_prints_its_help_and_exits_0(empty_directory: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_metaserve([], capsys)
    assert (code, err) == (0, "")
    assert "Usage: metaserve [OPTIONS] COMMAND [ARGS]..." in out


@pytest.mark.parametrize("command", ["submit", "train"])
def test_invalid_yaml_is_one_line_with_where_and_what(
        command: str, empty_directory: Path, capsys: pytest.CaptureFixture) -> None:
    (empty_directory / "bad.yaml").write_text("a: [1\nb: c: d\n")
    assert run_metaserve([command, "bad.yaml"], capsys) == (
        1, "", "error: bad.yaml is not valid YAML: line 2, column 2: "
               "expected ',' or ']', but got ':'\n")


def test_train_with_an_invalid_spec_names_each_bad_field_on_one_line(
        empty_directory: Path, capsys: pytest.CaptureFixture) -> None:
    (empty_directory / "job.yaml").write_text("algorithm: {name: maml}\ntask_family: {name: sine}\n")
    code, out, err = run_metaserve(["train", "job.yaml", "--set", "algorithm.inner_lr=-1",
                                    "--set", "iterations=0"], capsys)
    assert (code, out) == (1, "")
    assert err == ("error: invalid job spec job.yaml: algorithm.maml.inner_lr: Input should be "
                   "greater than 0; iterations: Input should be greater than or equal to 1\n")
    assert not (empty_directory / "runs").exists()


def test_serve_with_an_unreachable_database_is_one_line_naming_it(
        empty_directory: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METASERVE_DATABASE_URL", "postgresql+psycopg://postgres:pw@127.0.0.1:1/x")
    code, out, err = run_metaserve(["serve"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith("error: database postgresql+psycopg://postgres:***@127.0.0.1:1/x: ")
    assert err.count("\n") == 1


def test_the_old_url_option_of_keys_still_works_and_says_it_is_now_database_url(
        empty_directory: Path) -> None:
    (empty_directory / "other.db").touch()
    done = subprocess.run([METASERVE, "keys", "list", "--url", "sqlite:///other.db"],
                          cwd=empty_directory, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == "note: --url is deprecated here; it is --database-url"
    assert done.stderr.splitlines()[1].startswith("error: sqlite:///other.db is not a metaserve")
