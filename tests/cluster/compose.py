"""Reads docker-compose.yml the way ``docker compose`` does, as far as the cluster test needs:
a service's command (``command:`` over the image's ``CMD``) and its environment (the image's
``ENV`` lines, then ``env_file:``, then ``environment:``), with ``${VAR...}`` interpolation
from an environment the test makes (the role of the ``.env`` file next to the compose file).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


class InterpolationError(ValueError):
    """A ``${VAR:?message}`` (or ``${VAR?message}``) whose variable is missing."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution, applied to every string inside ``value``."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        name, op, arg = match["braced"], match["op"], match["arg"] or ""
        present = name in env
        filled = present and env[name] != ""
        if op is None:
            return env.get(name, "")
        if op in (":-", "-"):
            use_default = not filled if op == ":-" else not present
            return interpolate(arg, env) if use_default else env[name]
        if op in (":?", "?"):
            missing = not filled if op == ":?" else not present
            if missing:
                raise InterpolationError(f"{name}: {arg or 'required'}")
            return env[name]
        if op in (":+", "+"):
            use_alternative = filled if op == ":+" else present
            return interpolate(arg, env) if use_alternative else ""
        raise AssertionError(op)

    return _VARIABLE.sub(substitute, value)


def load(env: Mapping[str, str], path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file with every variable substituted from ``env``."""
    return interpolate(yaml.safe_load(path.read_text()), env)


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def dockerfile_env(dockerfile: Path) -> dict[str, str]:
    """The ``ENV`` settings of a Dockerfile (``ENV k=v k2=v2`` and ``ENV k v``)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line.strip(), comments=True) if line.strip() else []
        if not words or words[0].upper() != "ENV":
            continue
        if "=" in words[1]:
            env.update(word.split("=", 1) for word in words[1:])
        else:
            env[words[1]] = " ".join(words[2:])
    return env


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip().strip("'\"")
    return env


def image_env(compose: Mapping[str, Any], service: Mapping[str, Any]) -> dict[str, str]:
    """The ENV of the Dockerfile that builds the service's image ({} for outside images)."""
    image = service.get("image")
    for candidate in compose["services"].values():
        if "build" in candidate and (candidate is service or candidate.get("image") == image):
            build = candidate["build"]
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            return dockerfile_env(context / dockerfile)
    return {}


def environment_of(compose: Mapping[str, Any], name: str,
                   project_dir: Path = REPO) -> dict[str, str]:
    """What a container of service ``name`` sees: image ENV, then env_file, then environment."""
    service = compose["services"][name]
    env = image_env(compose, service)
    env_files = service.get("env_file", [])
    for entry in [env_files] if isinstance(env_files, (str, dict)) else env_files:
        path = entry if isinstance(entry, str) else entry["path"]
        required = True if isinstance(entry, str) else entry.get("required", True)
        if (project_dir / path).exists() or required:
            env.update(_env_file(project_dir / path))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({key: "" if value is None else str(value) for key, value in environment.items()})
    return env


def volumes_of(service: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(source, target)`` of each volume mount of the service."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts.append((source, target))
    return mounts
