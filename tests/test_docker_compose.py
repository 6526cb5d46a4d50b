"""docker-compose.yml describes a cluster this repository can build and run: every service
it needs, every build context, Dockerfile, ``COPY`` source, pinned image and ``metaserve``
command it names exists here, it runs on CPUs by default (docker-compose.gpu.yml adds GPUs),
every service has CPU and memory limits and each Ray node is told what its limit gives it,
each service gets only the secrets it uses, the API and the dispatcher store artifacts on the
S3 ``artifacts`` service, no secret is written in the file, long-running services restart,
draining services get an init and a grace period, every one has a health check, the image runs
as an unprivileged user and installs Ray and torch through constraints.txt. (tests/cluster runs
the file's commands on namespaces.)"""

from __future__ import annotations

import re
import tomllib
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
GPU_OVERRIDE = REPO / "docker-compose.gpu.yml"
CONSTRAINTS = REPO / "constraints.txt"
REQUIRED_SERVICES = {"postgres", "artifacts", "ray-head", "ray-worker", "api", "dispatcher"}
OFFICIAL_IMAGES = {"postgres", "chrislusf/seaweedfs", "redis"}
RAY_NODES = ("ray-head", "ray-worker")
DRAINING = ("api", "dispatcher")
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


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_the_cluster_runs_on_cpus_by_default(services):
    for name, service in services.items():
        assert not gpu_devices(service), f"{name} reserves a device; GPUs are docker-compose.gpu.yml's"
    assert "--num-gpus=0" in command_of(services["ray-worker"])


def test_the_gpu_override_reserves_a_gpu_per_worker_and_tells_ray(services):
    override = yaml.safe_load(GPU_OVERRIDE.read_text())["services"]
    assert override.keys() <= services.keys()
    devices = gpu_devices(override["ray-worker"])
    assert any("gpu" in device.get("capabilities", []) and device.get("count", 0) == 1
               for device in devices), devices
    command = command_of(override["ray-worker"])
    assert "--num-gpus=1" in command
    # the rest of the worker's command is the CPU worker's: same CPUs, memory and head
    cpu_command = command_of(services["ray-worker"])
    assert [w for w in command if w != "--num-gpus=1"] == \
        [w for w in cpu_command if w != "--num-gpus=0"]
    assert "TORCH_INDEX" in override["ray-head"]["build"]["args"]
    images = {override[name]["image"] for name in override if "image" in override[name]}
    assert len(images) == 1 and images != {services["ray-head"]["image"]}, images


def test_ray_worker_scales(services):
    worker = services["ray-worker"]
    assert "container_name" not in worker and "ports" not in worker


def test_the_api_and_the_dispatcher_use_the_object_store(services):
    for name in ("api", "dispatcher"):
        environment = services[name].get("environment", {})
        assert environment.get("METASERVE_ARTIFACT_ROOT") == ARTIFACT_ROOT, name
        assert environment.get("METASERVE_S3_ENDPOINT_URL") == "http://artifacts:9000", name
        for setting in ("METASERVE_S3_ACCESS_KEY_ID", "METASERVE_S3_SECRET_ACCESS_KEY"):
            assert environment.get(setting), (name, setting)
    for name, service in services.items():
        assert not any(target == "/artifacts" for _, target in _mounts(service)), name


# What each service may hold: the secrets (and the settings naming another service) it uses.
# A new service (e.g. a Redis for the head's GCS fault tolerance) names its own here, and the
# head's entry gains the Redis password if the head is given one.
NEEDS = {
    "postgres": {"POSTGRES_PASSWORD"},
    "artifacts": {"S3_ACCESS_KEY", "S3_SECRET_KEY"},
    "artifacts-init": set(),
    "redis": {"REDIS_PASSWORD"},  # the Ray head's GCS store (its health check logs in)
    # Ray nodes run job drivers and inner loops; the dispatcher hands a driver its storage
    # settings (Settings.storage_config), so a node holds no database or S3 credential.
    "ray-head": {"RAY_AUTH_TOKEN"},
    "ray-worker": {"RAY_AUTH_TOKEN"},
    # the API reads the database and streams artifacts; with --no-dispatcher it never calls Ray
    "api": {"METASERVE_DATABASE_URL", "METASERVE_S3_ACCESS_KEY_ID",
            "METASERVE_S3_SECRET_ACCESS_KEY"},
    "dispatcher": {"METASERVE_DATABASE_URL", "METASERVE_S3_ACCESS_KEY_ID",
                   "METASERVE_S3_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"},
}
PRIVILEGED = re.compile(SECRET_NAME.pattern + r"|DATABASE_URL")


def test_each_service_gets_only_the_secrets_it_uses(services):
    assert NEEDS.keys() == services.keys(), "a new service: say which secrets it needs"
    for name, service in services.items():
        held = {key for key in service.get("environment", {}) if PRIVILEGED.search(key)}
        assert held == NEEDS[name], (name, sorted(held))
    assert "METASERVE_RAY_ADDRESS" not in services["api"]["environment"]


@pytest.mark.slow  # a fresh interpreter imports torch and Ray: ~10-25 s
def test_the_api_serves_without_ray_or_its_token(engine, db_url, tmp_path):  # noqa: ANN001
    """What lets the API go without the Ray token: with its dispatcher off it answers
    /readyz and /v1 requests and never connects to Ray (in a fresh process, no RAY_* set)."""
    import os
    import subprocess
    import sys

    code = f"""
import ray
from fastapi.testclient import TestClient
from metaserve.api.app import create_app
from metaserve.service.settings import Settings
app = create_app(Settings(dispatcher=False, database_url={db_url!r}, data_dir={str(tmp_path)!r}))
with TestClient(app) as client:
    assert client.get("/readyz").status_code == 200, client.get("/readyz").text
    assert client.get("/v1/jobs").status_code == 401
    print("ray connected:", ray.is_initialized())
"""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RAY_", "METASERVE_"))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "ray connected: False"


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
    assert "s3.bucket.create -name metaserve" in " ".join(command_of(init))
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
    for name in ("ray-head", "ray-worker", "dispatcher"):
        environment = services[name]["environment"]
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


def _bytes(size: str | int) -> int:
    """A compose memory size (``8g``, ``512m``, bytes) in bytes."""
    text = str(size).strip().lower().rstrip("b")
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def _flag(command: list[str], name: str) -> str | None:
    values = [word.split("=", 1)[1] for word in command if word.startswith(f"--{name}=")]
    assert len(values) <= 1, (name, command)
    return values[0] if values else None


def test_every_service_has_cpu_and_memory_limits(services):
    for name, service in services.items():
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert float(limits.get("cpus", 0)) > 0, f"{name}: no CPU limit"
        assert _bytes(limits.get("memory", 0)) > 0, f"{name}: no memory limit"


def test_each_ray_node_is_told_what_its_limit_gives_it(services):
    """Ray would otherwise count the host's CPUs and memory in every replica."""
    for name in RAY_NODES:
        command = command_of(services[name])
        limits = services[name]["deploy"]["resources"]["limits"]
        cpus, memory = _flag(command, "num-cpus"), _flag(command, "memory")
        store = _flag(command, "object-store-memory")
        assert cpus is not None and memory is not None and store is not None, (name, command)
        assert int(store) <= _bytes(services[name]["shm_size"]), f"{name}: store beyond /dev/shm"
        assert int(memory) + int(store) <= _bytes(limits["memory"]), name
        if name == "ray-head":
            continue  # takes no work: 0 CPUs, 0 memory (test_ray_head_and_dispatchers_take_no_work)
        assert float(cpus) == float(limits["cpus"]), name
        # told most of its limit: what is left is for the raylet, its agents and the store
        assert int(memory) + int(store) >= 0.85 * _bytes(limits["memory"]), name


def test_memory_size_parser():
    assert _bytes("8g") == 8 * 2**30 and _bytes("256m") == 256 * 2**20 and _bytes(1000) == 1000
    assert _bytes("2gb") == 2 * 2**30


def test_the_object_store_image_has_atomic_conditional_writes(services):
    """The fenced checkpoint manifest needs If-None-Match/If-Match honoured under concurrent
    writers: SeaweedFS >= 4.18 (seaweedfs/seaweedfs#8802)."""
    for name in ("artifacts", "artifacts-init"):
        repository, tag = services[name]["image"].rsplit(":", 1)
        assert repository == "chrislusf/seaweedfs", name
        assert tuple(int(part) for part in tag.split(".")) >= (4, 18), (name, tag)


def test_every_image_is_pinned(services):
    override = yaml.safe_load(GPU_OVERRIDE.read_text())["services"]
    for name, service in [*services.items(), *override.items()]:
        image = service.get("image")
        if image is None:
            continue
        last = image.split("/")[-1]
        assert ":" in last, f"{name}: {image} has no tag"
        tag = last.split(":", 1)[1]
        assert tag != "latest" and any(character.isdigit() for character in tag), f"{name}: {image}"


def test_draining_services_get_an_init_and_a_grace_period(services):
    for name in DRAINING:
        service = services[name]
        assert service.get("init") is True, name
        grace = service.get("stop_grace_period", "10s")
        assert grace.endswith("s"), (name, grace)
        # the process's own drain ends well before compose's SIGKILL
        drain = float(service["environment"]["METASERVE_DRAIN_GRACE_S"])
        assert int(grace[:-1]) >= drain + 10, (name, grace, drain)


def test_the_drain_grace_is_a_setting():
    from metaserve.service.settings import Settings

    assert "drain_grace_s" in Settings.model_fields


def _dockerfile(services: dict[str, dict[str, Any]]) -> str:
    (_, dockerfile), = {build_of(s) for s in services.values() if "build" in s}
    return dockerfile.read_text().replace("\\\n", " ")


def test_the_image_runs_as_an_unprivileged_user(services):
    users = [line.split()[1] for line in _dockerfile(services).splitlines()
             if line.strip().upper().startswith("USER ")]
    assert users, "no USER: the image runs as root"
    assert users[-1].split(":")[0] not in {"root", "0"}, users
    for name, service in services.items():
        assert str(service.get("user", "")).split(":")[0] not in {"root", "0"}, name
        assert not service.get("privileged"), name


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_ray_and_torch_are_pinned_for_the_image_and_the_project(services):
    from packaging.requirements import Requirement

    pins = _pins()
    assert {"ray", "torch"} <= pins.keys()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = {Requirement(r).name.lower(): Requirement(r)
                    for r in pyproject["project"]["dependencies"]}
    for name in ("ray", "torch"):
        assert requirements[name].specifier.contains(pins[name]), (name, pins[name])
    installs = [line for line in _dockerfile(services).splitlines()
                if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    assert "constraints.txt" in dockerfile_copy_sources(build_of(services["ray-head"])[1])


def test_the_installed_ray_is_the_pinned_one():
    from importlib.metadata import version

    assert version("ray") == _pins()["ray"]


def test_secrets_and_local_state_stay_out_of_git_and_the_image():
    ignored = set((REPO / ".gitignore").read_text().split())
    assert ".env" in ignored
    dockerignore = set((REPO / ".dockerignore").read_text().split())
    assert {".env", ".git", ".venv/", ".metaserve/"} <= dockerignore
    for path in ("pyproject.toml", "README.md", "constraints.txt", "api", "service", "workers",
                 "migrations", "metaserve"):  # what the Dockerfile copies is not ignored
        assert path not in dockerignore and f"{path}/" not in dockerignore, path


COMPOSE_SCHEMA = REPO / "docker" / "schemas" / "compose-spec.json"


def compose_problems(document: dict[str, Any]) -> list[str]:
    """Violations of the Compose Specification's schema (what ``docker compose config``
    refuses: an unknown key, a wrong type), one line each."""
    import json

    import jsonschema

    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors(document)]


def test_the_compose_files_follow_the_compose_specification(compose):
    assert compose_problems(compose) == []
    assert compose_problems(yaml.safe_load(GPU_OVERRIDE.read_text())) == []


def test_a_misspelt_compose_key_is_refused(compose):
    import copy

    broken = copy.deepcopy(compose)
    broken["services"]["dispatcher"]["stop_grace_periode"] = "60s"
    assert any("stop_grace_periode" in line for line in compose_problems(broken))
    broken = copy.deepcopy(compose)
    broken["services"]["ray-worker"]["deploy"]["resources"]["limits"]["cpu"] = "4"
    assert any("cpu" in line for line in compose_problems(broken))
