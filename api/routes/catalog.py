from __future__ import annotations

from fastapi import APIRouter

from metaserve.api.catalog import catalog
from metaserve.api.deps import CurrentUser
from metaserve.api.schemas import CatalogEntry
from metaserve.workers.spec import ALGORITHMS, MODELS, PLUGINS, TASK_FAMILIES

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/algorithms")
def list_algorithms(_user: CurrentUser) -> list[CatalogEntry]:
    """Every algorithm with its parameters (type, default, bounds) and JSON schema."""
    return catalog(ALGORITHMS)


@router.get("/task-families")
def list_task_families(_user: CurrentUser) -> list[CatalogEntry]:
    """Every task family, built-in or from an installed plugin, with its parameters (type,
    default, bounds) and JSON schema."""
    return catalog(TASK_FAMILIES, PLUGINS.task_families)


@router.get("/networks")
def list_networks(_user: CurrentUser) -> list[CatalogEntry]:
    """Every network a job's ``model`` may name, built-in or from an installed plugin, with
    its parameters (type, default, bounds) and JSON schema. (``/v1/models`` is kept for
    registered models.)"""
    return catalog(MODELS, PLUGINS.models)
