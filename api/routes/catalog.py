from __future__ import annotations

from fastapi import APIRouter

from metaserve.api.catalog import catalog
from metaserve.api.deps import CurrentUser
from metaserve.api.schemas import CatalogEntry
from metaserve.workers.spec import ALGORITHMS, TASK_FAMILIES

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/algorithms")
def list_algorithms(_user: CurrentUser) -> list[CatalogEntry]:
    """Every algorithm with its parameters (type, default, bounds)."""
    return catalog(ALGORITHMS)


@router.get("/task-families")
def list_task_families(_user: CurrentUser) -> list[CatalogEntry]:
    """Every task family with its parameters (type, default, bounds)."""
    return catalog(TASK_FAMILIES)
