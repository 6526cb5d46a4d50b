"""Task-family registry: ``build_task_family(spec)`` turns a validated spec into a sampler.

The image families live in :mod:`metaserve.workers.tasks.images` and :mod:`metaserve.workers.tasks.glyphs` and
are imported only when asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from metaserve.workers.tasks.base import TaskBatch, TaskFamily, task_generator, task_seed

if TYPE_CHECKING:  # not at run time: a plugin imports tasks.base while the spec module loads it
    from metaserve.workers.spec import GlyphsSpec, ImagesSpec, LinearSpec, SineSpec

# name → (module, class); each class takes its spec as the only argument
TASK_FAMILY_CLASSES: dict[str, tuple[str, str]] = {
    "sine": ("metaserve.workers.tasks.regression", "SineFamily"),
    "linear": ("metaserve.workers.tasks.regression", "LinearFamily"),
    "images": ("metaserve.workers.tasks.images", "ImagesFamily"),
    "glyphs": ("metaserve.workers.tasks.glyphs", "GlyphsFamily"),
    "typefaces": ("metaserve.workers.tasks.typefaces", "TypefacesFamily"),
    "tabular": ("metaserve.workers.tasks.tabular", "TabularFamily"),
}


def build_task_family(spec: SineSpec | LinearSpec | ImagesSpec | GlyphsSpec) -> TaskFamily:
    """The task family named by ``spec.name``, constructed from ``spec``: a built-in, or an
    installed plugin's (:data:`metaserve.workers.spec.PLUGINS`)."""
    from metaserve.workers.spec import PLUGINS

    plugin = PLUGINS.task_families.get(spec.name)
    if plugin is not None:
        return plugin.implementation(spec)
    try:
        module_name, class_name = TASK_FAMILY_CLASSES[spec.name]
    except KeyError:
        known = sorted([*TASK_FAMILY_CLASSES, *PLUGINS.task_families])
        raise ValueError(f"unknown task family {spec.name!r}; known: {known}") from None
    family_class = getattr(importlib.import_module(module_name), class_name)
    return family_class(spec)


__all__ = ["TASK_FAMILY_CLASSES", "TaskBatch", "TaskFamily", "build_task_family", "task_generator", "task_seed"]
