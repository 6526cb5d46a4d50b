"""Plugins: networks and task families from other installed packages, found through Python
entry points, the ecosystem's convention (pytest's ``pytest11``, gymnasium's ``gymnasium.envs``).

A package declares, in its own ``pyproject.toml``::

    [project.entry-points."metaserve.models"]
    resmlp = "my_package.networks:ResidualMLP"

    [project.entry-points."metaserve.task_families"]
    oscillator = "my_package.tasks:DampedOscillatorFamily"

Each entry names a class implementing the same small interface as the built-ins:

- a **task family** class has a ``Spec`` (a :class:`~metaserve.workers.spec_base.StrictModel`
  subclass with ``name: Literal["<entry name>"] = "<entry name>"``, a default for every field,
  and ``input_shape`` / ``output_dim`` properties giving one example's input shape and the
  output size); ``Family(spec)`` has ``sample(*, seed, split, iteration, task_indices,
  support_shots=None) -> TaskBatch`` as in :class:`metaserve.workers.tasks.base.TaskFamily`,
  a pure function of its arguments (seed it with :func:`metaserve.workers.tasks.base.task_generator`).
  Regression only for now: ``is_classification`` must be false.
- a **model** class has a ``Spec`` the same way and
  ``Model(spec, input_shape, output_dim, prompt_dim=0)`` implements
  :class:`metaserve.workers.networks.FunctionalModel` (``init_params``, ``features``, ``head``,
  ``describe``; a subclass inherits ``head`` and ``__call__``).

The spec module loads them once per process while it builds its discriminated unions
(:data:`metaserve.workers.spec.PLUGINS`), so a plugin's spec is validated like a built-in's
(unknown fields, bounds, names in errors), and every process that validates a job (API,
dispatcher, Ray workers) finds the same plugins installed on its image. A plugin imports only
:mod:`~metaserve.workers.spec_base`, :mod:`~metaserve.workers.networks` and
:mod:`~metaserve.workers.tasks.base`, never :mod:`metaserve.workers.spec` (it is being built).

A broken plugin (its import fails, its class has no ``Spec``, its name is taken, its schema or
defaults are invalid) is one warning naming it and the reason, and is left out; it never takes
a process down.
"""

from __future__ import annotations

import logging
import re
import typing
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable, Mapping

from metaserve.workers.exceptions import PluginError
from metaserve.workers.spec_base import StrictModel

logger = logging.getLogger(__name__)

MODEL_GROUP = "metaserve.models"
TASK_FAMILY_GROUP = "metaserve.task_families"
GROUPS = {"model": MODEL_GROUP, "task_family": TASK_FAMILY_GROUP}
PLUGIN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
"""Entry names become ``name`` values in specs, catalogs and URLs: lowercase identifiers."""
MODEL_METHODS = ("init_params", "features", "head", "describe")
MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class Plugin:
    """One loaded plugin: its class, its spec model and where it came from."""

    kind: str
    """``model`` or ``task_family``."""
    name: str
    implementation: type
    spec: type[StrictModel]
    package: str
    version: str | None
    entry_point: str
    """The entry point's value, ``module:Class``."""

    def provenance(self) -> dict[str, Any]:
        """What an artifact records so a client without the plugin can say what to install."""
        return {"kind": self.kind, "name": self.name, "package": self.package,
                "version": self.version, "entry_point": self.entry_point}


@dataclass(frozen=True)
class BrokenPlugin:
    kind: str
    name: str
    package: str | None
    entry_point: str
    reason: str

    def message(self) -> str:
        """The one log line about it."""
        package = f"package {self.package}" if self.package else "unknown package"
        return (f"plugin {self.name!r} ({GROUPS[self.kind]} entry point {self.entry_point!r}, "
                f"{package}) is not loaded: {self.reason}")


@dataclass(frozen=True)
class Plugins:
    models: dict[str, Plugin] = field(default_factory=dict)
    task_families: dict[str, Plugin] = field(default_factory=dict)
    broken: tuple[BrokenPlugin, ...] = ()

    def of(self, kind: str) -> dict[str, Plugin]:
        return self.models if kind == "model" else self.task_families

    def source(self, kind: str, name: str) -> Plugin | None:
        """The plugin that provides ``name`` (None: a built-in, or unknown)."""
        return self.of(kind).get(name)

    def broken_for(self, field_name: str, name: object) -> BrokenPlugin | None:
        """The broken plugin of that name for a job spec's ``task_family`` or ``model``
        field (whatever else has the name: the caller checks the registries first)."""
        kind = "task_family" if field_name == "task_family" else "model"
        return next((b for b in self.broken if b.kind == kind and b.name == name), None)

    def used_by(self, spec: Mapping[str, Any]) -> list[Plugin]:
        """The plugins a job spec (as a dict) names: its task family and its model."""
        used = []
        family = (spec.get("task_family") or {}).get("name")
        model = (spec.get("model") or {}).get("name")
        if family in self.task_families:
            used.append(self.task_families[family])
        if model in self.models:
            used.append(self.models[model])
        return used


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _literal_name(spec: type[StrictModel]) -> tuple[str, ...]:
    """The values ``spec.name``'s ``Literal`` allows (empty when it is not a Literal)."""
    name_field = spec.model_fields.get("name")
    if name_field is None:
        return ()
    annotation = name_field.annotation
    if typing.get_origin(annotation) is not typing.Literal:
        return ()
    return typing.get_args(annotation)


def _check_spec(implementation: type, name: str) -> type[StrictModel]:
    spec = getattr(implementation, "Spec", None)
    if spec is None:
        raise PluginError(f"{implementation.__qualname__} has no Spec (a StrictModel subclass "
                          "describing its parameters)")
    if not (isinstance(spec, type) and issubclass(spec, StrictModel)):
        raise PluginError(f"{implementation.__qualname__}.Spec is not a subclass of "
                          "metaserve.workers.spec_base.StrictModel")
    if _literal_name(spec) != (name,):
        raise PluginError(f"{implementation.__qualname__}.Spec must declare "
                          f"name: Literal[{name!r}] = {name!r} (the entry point's name)")
    try:
        spec.model_json_schema()
    except Exception as error:  # noqa: BLE001 - any failure is the plugin's, reported
        raise PluginError(f"its Spec has no JSON schema: {type(error).__name__}: {error}") from None
    try:
        default = spec()
    except Exception as error:  # noqa: BLE001
        raise PluginError(f"its Spec's defaults do not validate (every field needs a default "
                          f"that works): {type(error).__name__}: {error}") from None
    if default.name != name:
        raise PluginError(f"its Spec's default name is {default.name!r}, not {name!r}")
    return spec


def _check_task_family(implementation: type, spec: type[StrictModel]) -> None:
    if not callable(getattr(implementation, "sample", None)):
        raise PluginError(f"{implementation.__qualname__} has no sample() method")
    if getattr(implementation, "is_classification", False):
        raise PluginError("classification task families are not supported as plugins yet "
                          "(is_classification must be false)")
    default = spec()
    try:
        input_shape = tuple(default.input_shape)
        output_dim = default.output_dim
    except Exception as error:  # noqa: BLE001
        raise PluginError(f"its Spec needs input_shape and output_dim properties: "
                          f"{type(error).__name__}: {error}") from None
    if not input_shape or not all(isinstance(size, int) and size >= 1 for size in input_shape):
        raise PluginError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
    if not (isinstance(output_dim, int) and output_dim >= 1):
        raise PluginError(f"output_dim must be a positive int, got {output_dim!r}")


def _check_model(implementation: type) -> None:
    missing = [method for method in MODEL_METHODS
               if not callable(getattr(implementation, method, None))]
    if missing:
        raise PluginError(f"{implementation.__qualname__} lacks {', '.join(missing)} "
                          "(the FunctionalModel interface)")


def _load(entry: metadata.EntryPoint, kind: str, taken: Iterable[str]) -> Plugin:
    name = entry.name
    if not PLUGIN_NAME.match(name):
        raise PluginError(f"the name must be a lowercase identifier ({PLUGIN_NAME.pattern})")
    if name in taken:
        raise PluginError(f"the name {name!r} is already a {kind.replace('_', ' ')} "
                          "(built-in or an earlier plugin)")
    try:
        implementation = entry.load()
    except (Exception, SystemExit) as error:  # noqa: BLE001 - the plugin's failure, reported
        raise PluginError(f"import failed: {type(error).__name__}: {error}") from None
    if not isinstance(implementation, type):
        raise PluginError(f"{entry.value} is not a class")
    spec = _check_spec(implementation, name)
    if kind == "task_family":
        _check_task_family(implementation, spec)
    else:
        _check_model(implementation)
    dist = entry.dist
    return Plugin(kind=kind, name=name, implementation=implementation, spec=spec,
                  package=dist.name if dist else entry.module.split(".")[0],
                  version=dist.version if dist else None, entry_point=entry.value)


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    """The group's entry points, each once (a distribution found twice on ``sys.path``
    declares its entries twice), in a stable order."""
    unique: dict[tuple[str, str], metadata.EntryPoint] = {}
    for entry in metadata.entry_points(group=group):
        unique.setdefault((entry.name, entry.value), entry)
    return sorted(unique.values(), key=lambda entry: (entry.name, entry.value))


def discover(*, builtin_models: Iterable[str], builtin_task_families: Iterable[str]) -> Plugins:
    """Load every installed plugin; the broken ones are logged (one line each) and skipped.

    Called once per process, by :mod:`metaserve.workers.spec` as it builds its unions."""
    loaded: dict[str, dict[str, Plugin]] = {"model": {}, "task_family": {}}
    builtins = {"model": set(builtin_models), "task_family": set(builtin_task_families)}
    broken: list[BrokenPlugin] = []
    for kind, group in GROUPS.items():
        for entry in _entry_points(group):
            try:
                plugin = _load(entry, kind, builtins[kind] | loaded[kind].keys())
            except PluginError as error:
                dist = entry.dist
                failure = BrokenPlugin(kind=kind, name=entry.name,
                                       package=dist.name if dist else None,
                                       entry_point=entry.value, reason=_one_line(str(error)))
                broken.append(failure)
                logger.warning(failure.message())
                continue
            loaded[kind][plugin.name] = plugin
    return Plugins(models=loaded["model"], task_families=loaded["task_family"],
                   broken=tuple(broken))
