"""The wheel installs one import name, ``metaserve``: nothing named ``api``, ``service``,
``workers`` or ``migrations`` lands in site-packages, and a user project with its own
``service/`` package imports the SDK as ``from metaserve import Client``.

The wheel is built from this checkout and unpacked into a directory that stands for a fresh
environment's site-packages; Python runs with ``-S`` (so this venv's editable install of
metaserve is not loaded) and sees that directory plus the third-party packages it depends on.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = ("api", "service", "workers", "migrations")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources: setuptools builds in the source tree (build/, *.egg-info).
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("metaserve", *SOURCE_FOLDERS):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=True, cwd=source, timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (wheel,) = out.glob("metaserve-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def _python(code: str, *, site_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    # -S: no .pth files, so the checkout's editable install is invisible; the third-party
    # dependencies (torch, fastapi, ...) come from this venv's site-packages after the wheel.
    path = os.pathsep.join([str(site_dir), *site.getsitepackages()])
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**env, "PYTHONPATH": path})


def test_wheel_holds_only_the_metaserve_package_with_every_source_module(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"metaserve"}
    expected = {f"metaserve/{path.relative_to(ROOT).as_posix()}"
                for folder in SOURCE_FOLDERS for path in (ROOT / folder).rglob("*.py")
                if "__pycache__" not in path.parts}
    assert expected - set(names) == set()
    assert "metaserve/migrations/script.py.mako" in names


@pytest.mark.parametrize("name", SOURCE_FOLDERS)
def test_bare_folder_names_are_not_importable_after_install(installed: Path, tmp_path: Path, name: str):
    result = _python(f"import {name}", site_dir=installed, cwd=tmp_path)
    assert result.returncode == 1
    assert f"ModuleNotFoundError: No module named '{name}'" in result.stderr


def test_project_with_its_own_service_package_imports_the_sdk(installed: Path, tmp_path: Path):
    project = tmp_path / "project"
    (project / "service").mkdir(parents=True)
    (project / "service" / "__init__.py").write_text("OWNER = 'the user project'\n")
    result = _python(
        "import service\n"
        "from metaserve import Client\n"
        "import metaserve.client as sdk\n"
        "print(service.OWNER, Client is sdk.Client, sdk.__file__.startswith(%r))"
        % str(installed),
        site_dir=installed, cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "the user project True True"


def test_migrations_run_from_the_installed_package(installed: Path, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    result = _python(
        "from metaserve.service import migrate\n"
        f"migrate.upgrade({url!r})\n"
        f"migrate.check({url!r})\n"
        "print(migrate.MIGRATIONS_DIR)",
        site_dir=installed, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(installed / "metaserve" / "migrations")


def test_wheel_ships_every_dashboard_and_docs_asset(wheel: Path):
    """The dashboard (``/``) and ``/docs`` serve files from inside the package: no CDN."""
    names = set(zipfile.ZipFile(wheel).namelist())
    static = ROOT / "api" / "static"
    expected = {f"metaserve/api/static/{path.relative_to(static).as_posix()}"
                for path in static.rglob("*") if path.is_file()}
    assert {"metaserve/api/static/index.html", "metaserve/api/static/app.js",
            "metaserve/api/static/vendor/uplot/uPlot.iife.min.js",
            "metaserve/api/static/vendor/uplot/LICENSE",
            "metaserve/api/static/vendor/swagger-ui/swagger-ui-bundle.js"} <= expected
    assert expected - names == set()


def test_wheel_ships_the_unicode_tables_of_the_typefaces_split(wheel: Path):
    """workers/tasks/typeface_split.py reads the Unicode Script and Block tables from the package."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"metaserve/workers/tasks/unicode/scripts.txt", "metaserve/workers/tasks/unicode/blocks.txt"} <= names
