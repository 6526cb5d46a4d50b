"""Installed distributions made on the fly for plugin tests: a ``*.dist-info`` directory with
``METADATA`` and ``entry_points.txt`` beside the modules it names, in a directory a test puts on
``sys.path`` (or a server's ``PYTHONPATH``). ``importlib.metadata`` finds it exactly as it finds
a pip-installed package, so the real plugin loader runs on it."""

from __future__ import annotations

import textwrap
from pathlib import Path

BROKEN_PACKAGE = "metaserve-broken-plugins"
# One module holding a plugin for every way a plugin can be broken but an import error.
BROKEN_MODULE = '''
from typing import Literal

from pydantic import ConfigDict

from metaserve.workers.spec_base import StrictModel


class NoSpec:
    def sample(self, **kwargs):
        raise AssertionError("never sampled")


class Opaque:
    """A type pydantic has no JSON schema for."""


class BadSchema:
    class Spec(StrictModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        name: Literal["bad_schema"] = "bad_schema"
        thing: Opaque = Opaque()

    def sample(self, **kwargs):
        raise AssertionError("never sampled")


class NoDefaults:
    class Spec(StrictModel):
        name: Literal["no_defaults"] = "no_defaults"
        width: int

    def sample(self, **kwargs):
        raise AssertionError("never sampled")


class WrongName:
    class Spec(StrictModel):
        name: Literal["other"] = "other"

    def sample(self, **kwargs):
        raise AssertionError("never sampled")


class SineAgain:
    class Spec(StrictModel):
        name: Literal["sine"] = "sine"

    def sample(self, **kwargs):
        raise AssertionError("never sampled")


class NoShapes:
    class Spec(StrictModel):
        name: Literal["no_shapes"] = "no_shapes"

    def sample(self, **kwargs):
        raise AssertionError("never sampled")


class HalfModel:
    class Spec(StrictModel):
        name: Literal["half_model"] = "half_model"

    def init_params(self, generator):
        return {}


NOT_A_CLASS = 42
'''
IMPORT_ERROR_MODULE = "import metaserve_plugin_dependency_that_is_not_installed  # noqa: F401\n"
# entry name -> (group, value, the reason the loader gives)
BROKEN_ENTRIES = {
    "import_error": ("metaserve.task_families", "broken_import_plugin:Family",
                     "import failed: ModuleNotFoundError: No module named "
                     "'metaserve_plugin_dependency_that_is_not_installed'"),
    "no_spec": ("metaserve.task_families", "broken_plugins:NoSpec",
                "NoSpec has no Spec (a StrictModel subclass describing its parameters)"),
    "bad_schema": ("metaserve.task_families", "broken_plugins:BadSchema",
                   "its Spec has no JSON schema: PydanticInvalidForJsonSchema: Cannot generate "
                   "a JsonSchema for core_schema.IsInstanceSchema ("),
    "no_defaults": ("metaserve.task_families", "broken_plugins:NoDefaults",
                    "its Spec's defaults do not validate (every field needs a default that "
                    "works): ValidationError: 1 validation error for Spec width Field required "
                    "[type=missing, input_value={}, input_type=dict]"),
    "wrong_name": ("metaserve.task_families", "broken_plugins:WrongName",
                   "WrongName.Spec must declare name: Literal['wrong_name'] = 'wrong_name' "
                   "(the entry point's name)"),
    "sine": ("metaserve.task_families", "broken_plugins:SineAgain",
             "the name 'sine' is already a task family (built-in or an earlier plugin)"),
    "no_shapes": ("metaserve.task_families", "broken_plugins:NoShapes",
                  "its Spec needs input_shape and output_dim properties: AttributeError: "
                  "'Spec' object has no attribute 'input_shape'"),
    "Not-Lowercase": ("metaserve.models", "broken_plugins:HalfModel",
                      "the name must be a lowercase identifier (^[a-z][a-z0-9_]{0,63}$)"),
    "half_model": ("metaserve.models", "broken_plugins:HalfModel",
                   "HalfModel lacks features, head, describe (the FunctionalModel interface)"),
    "not_a_class": ("metaserve.models", "broken_plugins:NOT_A_CLASS",
                    "broken_plugins:NOT_A_CLASS is not a class"),
}

# Reasons that quote pydantic, whose wording (a type's repr, a link naming its version) moves
# between its releases: the reason starts with the text above.
QUOTING_PYDANTIC = frozenset({"bad_schema", "no_defaults"})


def reason_matches(name: str, reason: str) -> bool:
    """Whether ``reason`` is the one :data:`BROKEN_ENTRIES` gives for ``name``."""
    expected = BROKEN_ENTRIES[name][2]
    return reason.startswith(expected) if name in QUOTING_PYDANTIC else reason == expected


def write_distribution(directory: Path, name: str, version: str,
                       entries: dict[str, dict[str, str]], modules: dict[str, str]) -> Path:
    """A distribution ``name`` (``version``) in ``directory``: its modules (file name →
    source) and a dist-info declaring ``entries`` (group → {entry name: "module:attr"})."""
    directory.mkdir(parents=True, exist_ok=True)
    for filename, source in modules.items():
        (directory / filename).write_text(textwrap.dedent(source))
    info = directory / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{entry} = {value}\n" for entry, value in named.items()) + "\n"
        for group, named in entries.items()))
    return directory


def write_broken_plugins(directory: Path, names: list[str] | None = None) -> Path:
    """The broken plugins of :data:`BROKEN_ENTRIES` (or only ``names``) as one installed
    distribution, :data:`BROKEN_PACKAGE`."""
    entries: dict[str, dict[str, str]] = {}
    for entry, (group, value, _reason) in BROKEN_ENTRIES.items():
        if names is None or entry in names:
            entries.setdefault(group, {})[entry] = value
    return write_distribution(directory, BROKEN_PACKAGE, "0.0.1", entries,
                              {"broken_plugins.py": BROKEN_MODULE,
                               "broken_import_plugin.py": IMPORT_ERROR_MODULE})
