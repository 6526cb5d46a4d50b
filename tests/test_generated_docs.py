"""The generated pages (docs/build.py) are what their sources say: docs/SETTINGS.md lists every
field of ``Settings``, docs/BENCHMARKS.md is its template over the raw JSON, and stays short."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from metaserve.service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MAX_BYTES = 15 * 1024


def load_build():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("docs_build", REPO / "docs" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build = load_build()


GENERATED = ["SETTINGS.md"] + sorted(path.name for path in (REPO / "docs" / "templates").glob("*.md")
                                     if path.name != "README.md")


@pytest.mark.parametrize("page", GENERATED)
def test_the_page_is_what_docs_build_writes(page: str) -> None:
    expected = build.pages(names=[page])[REPO / "docs" / page]
    assert (REPO / "docs" / page).read_text() == expected, f"run: python docs/build.py ({page} is stale)"


def test_benchmarks_stays_under_15_kb() -> None:
    size = len((REPO / "docs" / "BENCHMARKS.md").read_bytes())
    assert size <= BENCHMARKS_MAX_BYTES, (
        f"docs/BENCHMARKS.md is {size:,} bytes: move investigations to docs/notes/ and keep one "
        "short paragraph per table")


def test_settings_page_has_a_row_per_setting_with_its_default() -> None:
    text = (REPO / "docs" / "SETTINGS.md").read_text()
    rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `METASERVE_")}
    assert set(rows) == {f"METASERVE_{name.upper()}" for name in Settings.model_fields}
    assert "| `METASERVE_PORT` | integer | `8000` | ≥ 1, ≤ 65535 |" in rows["METASERVE_PORT"]


def write_json(path: Path, value: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path.name


def test_a_table_takes_every_figure_from_its_raw_json_and_marks_what_it_lacks(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    write_json(tmp_path / "results" / "run.json", {
        "command": "bench.py --seeds 0 1", "seeds": [0, 1],
        "rows": [{"method": "maml", "accuracy": 0.5, "ci95": 0.02},
                 {"method": "anil", "accuracy": 0.25}]})
    template = """## Accuracy

<!-- table
raw: results/run.json
rows: rows
command: "{command}"
hardware: CPU-2
seeds: "{seeds}"
columns:
  method: "{method}"
  accuracy: "{accuracy:.1%} ± {ci95:.1%}"
-->
"""
    page = tmp_path / "docs" / "PAGE.md"
    rendered = build.render_template(template, tmp_path, page)
    assert rendered.split("\n", 2)[2] == (
        "## Accuracy\n\n"
        "Run: `bench.py --seeds 0 1` · CPU-2 · seeds: 0, 1 · not in the raw JSON · "
        "raw: [`run.json`](../results/run.json)\n\n"
        "| method | accuracy |\n| --- | --- |\n"
        "| maml | 50.0% ± 2.0% |\n"
        "| anil | – |\n")


def test_groups_give_the_mean_and_range_over_seeds(tmp_path: Path) -> None:
    write_json(tmp_path / "r.json", {"rows": [
        {"setting": "5w1s", "seed": 0, "accuracy": 0.4}, {"setting": "5w1s", "seed": 1, "accuracy": 0.5},
        {"setting": "20w1s", "seed": 0, "accuracy": 0.2}]})
    table = build.Table.parse('raw: r.json\nrows: rows\ngroup_by: [setting]\ncolumns:\n'
                              '  setting: "{setting}"\n  mean: "{mean_accuracy:.2f}"\n'
                              '  range: "{min_accuracy}–{max_accuracy} ({n})"\n', "test")
    rows = table.render(tmp_path, tmp_path / "PAGE.md").splitlines()[4:]
    assert rows == ["| 5w1s | 0.45 | 0.4–0.5 (2) |", "| 20w1s | 0.20 | 0.2–0.2 (1) |"]


def test_a_table_naming_a_missing_raw_file_is_an_error(tmp_path: Path) -> None:
    table = build.Table.parse('raw: results/none.json\ncolumns:\n  a: "{a}"\n', "PAGE.md")
    with pytest.raises(build.TemplateError, match="raw file results/none.json does not exist"):
        table.render(tmp_path, tmp_path / "PAGE.md")
