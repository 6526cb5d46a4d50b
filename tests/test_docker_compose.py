"""docker-compose.yml describes a cluster this repository can build and run: every service
it needs, every build context, Dockerfile, ``COPY`` source, image and ``metaserve`` command it
names exists here, GPU workers reserve a GPU, every metaserve service stores artifacts on the
S3 ``artifacts`` service, no secret is written in the file, long-running services restart, and
every one has a health check. (tests/cluster runs the file's commands on namespaces.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from metaserve.cli import app

try:  # typer >= 0.20 vendors click as typer._click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on the real click
    from click import UsageError

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
REQUIRED_SERVICES = {"postgres", "artifacts", "ray-head", "ray-worker", "api", "dispatcher"}
OFFICIAL_IMAGES = {"postgres", "minio/minio", "minio/mc"}
ARTIFACT_ROOT = "s3://metaserve/artifacts"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$")
INTERPOLATED = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[?].*)?\}$")


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
    assert resolved["dispatcher healthcheck"] == ["dispatcher"]
    assert "--health" in commands["dispatcher healthcheck"]


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


def test_every_metaserve_service_uses_the_object_store(services):
    running_metaserve = metaserve_services(services)
    assert {"ray-head", "ray-worker", "api", "dispatcher"} <= running_metaserve.keys()
    for name, service in running_metaserve.items():
        environment = service.get("environment", {})
        assert environment.get("METASERVE_ARTIFACT_ROOT") == ARTIFACT_ROOT, name
        assert environment.get("METASERVE_S3_ENDPOINT_URL") == "http://artifacts:9000", name
        for setting in ("METASERVE_S3_ACCESS_KEY_ID", "METASERVE_S3_SECRET_ACCESS_KEY"):
            assert environment.get(setting), (name, setting)
        assert not any(target == "/artifacts" for _, target in _mounts(service)), name


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(volume.split(":")[:2]) if isinstance(volume, str)
            else (volume["source"], volume["target"]) for volume in service.get("volumes", [])]


def test_no_secret_is_written_in_the_file(services):
    """Passwords, keys and tokens come from the environment (.env), never literally."""
    for name, service in services.items():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if SECRET_NAME.search(key):
                assert INTERPOLATED.match(str(value)), f"{name}: {key} is written in the file"
        database_url = environment.get("METASERVE_DATABASE_URL", "")
        if database_url:
            password = database_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
            assert INTERPOLATED.match(password), f"{name}: database password written in the file"


def test_the_bucket_is_created_before_the_api_starts(services):
    init = services["artifacts-init"]
    assert "mc mb --ignore-existing store/metaserve" in " ".join(command_of(init))
    assert services["api"]["depends_on"]["artifacts-init"]["condition"] == \
        "service_completed_successfully"


def test_long_running_services_restart(services):
    for name, service in services.items():
        expected = "on-failure" if name == "artifacts-init" else "unless-stopped"
        assert service.get("restart") == expected, name


def test_ray_head_and_dispatchers_take_no_work(services):
    """The head schedules only; inner loops and job drivers (which ask for memory) go to the
    workers. Dispatchers join as resource-less nodes (service/ray_cluster.py)."""
    head = command_of(services["ray-head"])
    assert {"--num-cpus=0", "--num-gpus=0", "--memory=0"} <= set(head), head
    from metaserve.service.ray_cluster import node_join_command

    joined = node_join_command("ray-head:6379")
    assert {"--num-cpus=0", "--num-gpus=0", "--memory=0"} <= set(joined), joined
    assert services["dispatcher"]["environment"]["METASERVE_RAY_ADDRESS"] == "ray-head:6379"
    for name in ("ray-head", "ray-worker", "dispatcher"):
        assert services[name].get("shm_size"), f"{name}: a Ray node's object store needs /dev/shm"


def test_ray_token_auth_is_on(services):
    for name, service in metaserve_services(services).items():
        environment = service["environment"]
        assert environment.get("RAY_AUTH_MODE") == "token", name
        assert INTERPOLATED.match(environment.get("RAY_AUTH_TOKEN", "")), name


def test_api_listens_on_all_interfaces_and_keeps_its_admin_key_on_a_volume(compose, services):
    environment = services["api"]["environment"]
    assert environment.get("METASERVE_HOST") == "0.0.0.0"
    data_dir = environment["METASERVE_DATA_DIR"]
    volumes = dict((target, source) for source, target in _mounts(services["api"]))
    assert volumes.get(data_dir) in compose["volumes"], (data_dir, volumes)


def test_every_service_has_a_healthcheck(services):
    for name, service in services.items():
        if service.get("restart") == "on-failure" and name.endswith("-init"):
            continue  # a one-shot: compose waits for it to complete instead
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable", False), name


def test_dependencies_name_services_of_the_file(services):
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert set(depends_on) <= services.keys() - {name}, name
