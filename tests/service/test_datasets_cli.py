"""``metaserve datasets upload|list|show|delete`` and the SDK's dataset calls, against the
real API served by uvicorn in a thread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metaserve.cli import app
from metaserve.client import Client, NotFound
from tests import synthetic_datasets as synth

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("isolated_config")


@pytest.fixture(autouse=True)
def server_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The live server's state and artifact store (its settings come from the environment)."""
    monkeypatch.setenv("METASERVE_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("METASERVE_DATA_DIR", str(tmp_path / "state"))


@pytest.fixture
def dataset_file(tmp_path: Path) -> Path:
    path = tmp_path / "shapes.npz"
    path.write_bytes(synth.npz_bytes(*synth.shapes(classes=5, per_class=4)))
    return path


def test_the_cli_uploads_lists_shows_and_deletes_a_dataset(
        live_url: str, key: str, dataset_file: Path, monkeypatch) -> None:  # noqa: ANN001, F811
    monkeypatch.setenv("METASERVE_URL", live_url)
    monkeypatch.setenv("METASERVE_API_KEY", key)
    uploaded = runner.invoke(app, ["datasets", "upload", str(dataset_file), "--name", "shapes"],
                             catch_exceptions=False)
    assert uploaded.exit_code == 0, uploaded.output
    dataset_id = uploaded.output.strip().splitlines()[-1].split()[0]
    assert uploaded.output.strip().splitlines()[-1] == (
        f"{dataset_id}  shapes  npz  5 classes  20 images of 1×28×28  "
        f"{dataset_file.stat().st_size:,} bytes")
    listed = runner.invoke(app, ["datasets", "list"], catch_exceptions=False)
    assert listed.output.strip().splitlines()[-1] == uploaded.output.strip().splitlines()[-1]
    shown = runner.invoke(app, ["datasets", "show", dataset_id], catch_exceptions=False)
    assert json.loads(shown.output)["id"] == dataset_id
    deleted = runner.invoke(app, ["datasets", "delete", dataset_id], catch_exceptions=False)
    assert (deleted.exit_code, deleted.output) == (0, f"deleted {dataset_id}\n")
    again = runner.invoke(app, ["datasets", "show", dataset_id], catch_exceptions=False)
    assert again.exit_code == 1 and "Dataset not found" in again.output


def test_the_sdk_streams_the_file_and_reports_progress(
        live_url: str, key: str, dataset_file: Path) -> None:  # noqa: F811
    seen: list[tuple[int, int]] = []
    with Client(url=live_url, api_key=key) as client:
        dataset = client.upload_dataset(dataset_file, progress=lambda *a: seen.append(a))
        assert (dataset["name"], dataset["images"], dataset["bytes"]) == (
            "shapes.npz", 20, dataset_file.stat().st_size)
        assert client.datasets() == [dataset]
        assert client.dataset(dataset["id"]) == dataset
        client.delete_dataset(dataset["id"])
        with pytest.raises(NotFound):
            client.dataset(dataset["id"])
    assert seen[-1] == (dataset_file.stat().st_size, dataset_file.stat().st_size)


def test_the_cli_uploads_a_table_quietly_and_lists_it_by_rows_and_columns(
        live_url: str, key: str, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001, F811
    monkeypatch.setenv("METASERVE_URL", live_url)
    monkeypatch.setenv("METASERVE_API_KEY", key)
    table = tmp_path / "panel.csv"
    table.write_text("entity,x,y\n" + "".join(f"e{i % 3},{i},{2 * i + i % 3}\n" for i in range(30)))
    uploaded = runner.invoke(app, ["datasets", "upload", "-q", str(table)], catch_exceptions=False)
    assert uploaded.exit_code == 0, uploaded.output
    dataset_id = uploaded.output.removesuffix("\n")
    assert dataset_id.startswith("ds_") and len(dataset_id) == 29, uploaded.output
    listed = runner.invoke(app, ["datasets", "list"], catch_exceptions=False)
    assert listed.output.strip().splitlines()[-1] == (
        f"{dataset_id}  panel.csv  csv  30 rows of 3 columns  {table.stat().st_size:,} bytes")
