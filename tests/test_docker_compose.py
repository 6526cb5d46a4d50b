"""docker-compose.yml describes a cluster this repository can build and run: every service
it needs, every build context, Dockerfile, ``COPY`` source, image and ``metaserve`` command it
names exists here, GPU workers reserve a GPU, every metaserve service shares the artifacts
volume, and every service has a health check."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from metaserve.service.cli import app

try:  # typer >= 0.20 vendors click as typer._click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on the real click
    from click import UsageError

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
REQUIRED_SERVICES = {"postgres", "ray-head", "ray-worker", "api", "dispatcher"}
OFFICIAL_IMAGES = {"postgres"}
ARTIFACT_ROOT_IN_CONTAINERS = "/artifacts"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def metaserve_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services running metaserve's code: its commands, or ``ray`` in the metaserve image (the
    Ray nodes import the workers package and write the job artifacts)."""
    built = built_images(services)
    return {name: service for name, service in services.items()
            if command_of(service)[:1] == ["metaserve"] or service.get("image") in built}


def built_images(services: dict[str, dict[str, Any]]) -> set[str]:
    return {service["image"] for service in services.values()
            if "build" in service and "image" in service}


def build_of(service: dict[str, Any]) -> tuple[Path, Path]:
    build = service["build"]
    context = REPO / (build if isinstance(build, str) else build.get("context", "."))
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return context, context / dockerfile


def test_compose_has_every_cluster_service(services):
    assert REQUIRED_SERVICES <= services.keys()


def test_every_build_context_and_dockerfile_exists(services):
    builds = [build_of(service) for service in services.values() if "build" in service]
    assert builds, "no service builds the metaserve image"
    for context, dockerfile in builds:
        assert context.is_dir(), context
        assert dockerfile.is_file(), dockerfile
        assert context.resolve().is_relative_to(REPO)


def test_every_image_is_built_here_or_official(services):
    built = built_images(services)
    for name, service in services.items():
        image = service.get("image")
        if image is None:
            assert "build" in service, f"{name} has neither image nor build"
            continue
        repository = image.rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image
        assert image in built or repository in OFFICIAL_IMAGES, f"{name}: {image}"


def dockerfile_copy_sources(dockerfile: Path) -> list[str]:
    """The source paths of every ``COPY`` (and ``ADD``) instruction, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    sources = []
    for line in text.splitlines():
        words = shlex.split(line.strip(), comments=True) if line.strip() else []
        if words and words[0].upper() in {"COPY", "ADD"}:
            arguments = [word for word in words[1:] if not word.startswith("--")]
            sources += arguments[:-1]
    return sources


def test_every_dockerfile_copy_source_exists(services):
    for context, dockerfile in {build_of(s) for s in services.values() if "build" in s}:
        sources = dockerfile_copy_sources(dockerfile)
        assert {"pyproject.toml", "api", "service", "workers", "migrations"} <= set(sources)
        for source in sources:
            assert (context / source).exists(), f"{dockerfile.name}: COPY {source}"


def test_dockerfile_copy_parser_reads_continuations_and_flags(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM x\nCOPY --chown=a:b a.toml \\\n  b.md ./\n# COPY nope /\n"
                          "RUN echo COPY\nADD c /c\n")
    assert dockerfile_copy_sources(dockerfile) == ["a.toml", "b.md", "c"]


def resolve_cli(arguments: list[str]) -> list[str]:
    """Parse ``metaserve <arguments>`` with the real typer app and return the names of the
    (sub)commands it runs, e.g. ``["db", "check"]``; raises UsageError (unknown command
    or option, missing argument) where the CLI would refuse the command line."""
    command = typer.main.get_command(app)
    context, path, arguments = None, [], list(arguments)
    while hasattr(command, "commands"):  # a group: the next word names a subcommand
        context = command.make_context(path[-1] if path else "metaserve", [],
                                       parent=context, resilient_parsing=True)
        if not arguments or arguments[0] not in command.commands:
            raise UsageError(f"no such command: {arguments[:1]}", context)
        path.append(arguments[0])
        command, arguments = command.commands[arguments[0]], arguments[1:]
    command.make_context(path[-1], arguments, parent=context)
    return path


def test_every_metaserve_command_exists_in_the_cli(services):
    commands = {name: command_of(service) for name, service in services.items()
                if command_of(service)[:1] == ["metaserve"]}
    for name, service in services.items():
        check = service.get("healthcheck", {}).get("test", [])
        if check[:2] == ["CMD", "metaserve"]:
            commands[f"{name} healthcheck"] = check[1:]
    assert {"api", "dispatcher"} <= commands.keys()
    resolved = {name: resolve_cli(command[1:]) for name, command in commands.items()}
    assert resolved["api"] == ["serve"]
    assert resolved["dispatcher"] == ["dispatcher"]
    assert resolved["dispatcher healthcheck"] == ["db", "check"]


def test_resolve_cli_refuses_what_the_cli_refuses():
    assert resolve_cli(["serve", "--no-dispatcher"]) == ["serve"]
    assert resolve_cli(["db", "check"]) == ["db", "check"]
    for arguments in (["nope"], ["serve", "--no-such-option"], ["db", "nope"], ["db"],
                      ["serve", "extra"]):
        with pytest.raises(UsageError):
            resolve_cli(arguments)


def test_api_runs_with_its_dispatcher_off(services):
    assert "--no-dispatcher" in command_of(services["api"])


def test_ray_worker_reserves_a_gpu(services):
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device.get("capabilities", []) and device.get("count", 0) != 0
               for device in devices), devices


def test_ray_worker_scales(services):
    worker = services["ray-worker"]
    assert "container_name" not in worker and "ports" not in worker


def test_every_metaserve_service_mounts_the_shared_artifacts_volume(compose, services):
    assert "artifacts" in compose["volumes"]
    running_metaserve = metaserve_services(services)
    assert {"ray-head", "ray-worker", "api", "dispatcher"} <= running_metaserve.keys()
    for name, service in running_metaserve.items():
        mounts = [volume if isinstance(volume, str) else
                  f"{volume['source']}:{volume['target']}" for volume in service.get("volumes", [])]
        assert f"artifacts:{ARTIFACT_ROOT_IN_CONTAINERS}" in mounts, name
        environment = service.get("environment", {})
        assert environment.get("METASERVE_ARTIFACT_ROOT") == ARTIFACT_ROOT_IN_CONTAINERS, name


def test_every_service_has_a_healthcheck(services):
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable", False), name


def test_dependencies_name_services_of_the_file(services):
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert set(depends_on) <= services.keys() - {name}, name
