"""The algorithm, task-family and network catalogs, generated from the pydantic spec models
(:data:`metaserve.workers.spec.ALGORITHMS`, :data:`~metaserve.workers.spec.TASK_FAMILIES`,
:data:`~metaserve.workers.spec.MODELS`), never written twice; an installed plugin's entry says
which package it came from."""

from __future__ import annotations

import inspect
from typing import Any

from pydantic import BaseModel

from metaserve.api.schemas import CatalogEntry, ParameterPublic
from metaserve.workers.plugins import Plugin

_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
               "maxLength", "minItems", "maxItems")


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        return defs[ref.rsplit("/", 1)[-1]]
    return schema


def _type_name(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    schema = _resolve(schema, defs)
    if "anyOf" in schema:
        return " | ".join(_type_name(option, defs) for option in schema["anyOf"])
    if "const" in schema:
        return type(schema["const"]).__name__ if not isinstance(schema["const"], str) else "string"
    kind = schema.get("type", "object")
    if kind == "array":
        if "prefixItems" in schema:
            return f"array[{', '.join(_type_name(item, defs) for item in schema['prefixItems'])}]"
        if "items" in schema:
            return f"array[{_type_name(schema['items'], defs)}]"
    return kind


def _bounds(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    schema = _resolve(schema, defs)
    bounds: dict[str, Any] = {key: schema[key] for key in _BOUND_KEYS if key in schema}
    if "enum" in schema:
        bounds["choices"] = schema["enum"]
    for option in schema.get("anyOf", []):
        bounds.update({key: value for key, value in _bounds(option, defs).items()
                       if key not in bounds})
    if isinstance(schema.get("items"), dict):
        item_bounds = _bounds(schema["items"], defs)
        if item_bounds:
            bounds["items"] = item_bounds
    return bounds


def describe_parameters(model: type[BaseModel]) -> list[ParameterPublic]:
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    return [
        ParameterPublic(name=name, type=_type_name(prop, defs), default=prop.get("default"),
                        bounds=_bounds(prop, defs), description=prop.get("description"))
        for name, prop in schema.get("properties", {}).items()
        if name != "name"
    ]


def catalog(models: dict[str, type[BaseModel]],
            plugins: dict[str, Plugin] | None = None) -> list[CatalogEntry]:
    """One entry per spec model; those in ``plugins`` are marked with their package."""
    entries = []
    for name, model in models.items():
        plugin = (plugins or {}).get(name)
        entries.append(CatalogEntry(
            name=name, description=inspect.cleandoc(model.__doc__ or name),
            parameters=describe_parameters(model), json_schema=model.model_json_schema(),
            source="plugin" if plugin else "builtin",
            package=plugin.package if plugin else None,
            version=plugin.version if plugin else None))
    return entries
