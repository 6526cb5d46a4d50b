"""``GET /v1/sweeps/{id}/importance``: which swept parameters the sweep's metric depends on,
estimated from its finished trials (docs/DASHBOARD.md, "Parameter importance").

The estimate is a first-order variance decomposition (the main-effect part of fANOVA): for each
swept path, the share of the variance of the metric's *ranks* that the path's value explains on
its own. The trials are grouped by the path's value (a numeric path with more distinct values
than ``max(sqrt(n), n / 2)`` is cut into ``sqrt(n)`` equal-count bins, on a log scale when it
spans 100x or more), and the share is the adjusted correlation ratio (epsilon squared)

    (SS_between - (k - 1) * SS_within / (n - k)) / SS_total,

clamped at 0, so that a path which does not matter scores about 0 whatever its number of groups.
Ranks keep one diverging trial from deciding the answer. Interactions are not counted: shares
need not sum to 1, and what they leave is interaction plus noise. ``spearman`` says which way a
numeric path acts (its rank correlation with the metric; the metric as measured, not "better").
numpy only: the scores are for reading, not for a decision the service makes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from metaserve.api.deps import CurrentUser, PathText, SessionDep
from metaserve.api.schemas import ErrorResponse, model_response
from metaserve.service import sweeps
from metaserve.service.orm import JobStatus

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
})

MIN_TRIALS = 4  # fewer finished trials say nothing about a parameter
# Finished: succeeded, or stopped early by the scheduler (recorded as cancelled or stopped).
FINISHED = {status for status in JobStatus if status.value in ("succeeded", "cancelled", "stopped")}
METHOD = ("first-order variance share of the metric's ranks (adjusted correlation ratio, "
          "epsilon squared); a numeric path with more than max(sqrt(n), n/2) values in sqrt(n) "
          "equal-count bins")


class ParameterImportance(BaseModel):
    path: str
    importance: float | None = Field(description="Share of the metric's rank variance this path "
                                                 "explains alone, 0 to 1; null: constant here.")
    spearman: float | None = Field(description="Rank correlation of a numeric path with the "
                                               "metric; null for a categorical one.")
    groups: int = Field(description="Values or bins the trials were grouped into.")


class ImportancePublic(BaseModel):
    sweep_id: str
    metric: str
    mode: str
    method: str
    trials_used: int = Field(description="Finished trials with a value of the metric.")
    parameters: list[ParameterImportance] = Field(description="Most important first.")
    note: str | None = Field(None, description="Why there is no estimate, when there is none.")


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), 0-based."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def _groups(column: list[Any], n: int) -> tuple[np.ndarray, bool]:
    """A group label per trial, and whether the column is numeric."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  for v in column)
    if not numeric:
        labels = [json.dumps(v, sort_keys=True) for v in column]
        keys = {label: index for index, label in enumerate(sorted(set(labels)))}
        return np.array([keys[label] for label in labels]), False
    values = np.asarray(column, dtype=float)
    distinct = np.unique(values)
    bins = max(2, int(math.floor(math.sqrt(n))))
    if len(distinct) <= max(bins, n // 2):  # a grid: each value has trials enough of its own
        return np.searchsorted(distinct, values), True
    if distinct[0] > 0 and distinct[-1] / distinct[0] >= 100:
        values = np.log(values)
    # Equal-count bins by rank (ties stay together: they share a rank).
    return np.minimum((_ranks(values) * bins / n).astype(int), bins - 1), True


def first_order_importance(configs: list[dict[str, Any]], values: list[float],
                           paths: list[str]) -> list[dict[str, Any]]:
    """For each path, its share of the variance of the ranks of ``values`` (see the module's
    docstring), most important first. ``configs[i][path]`` is trial i's value of ``path``."""
    y = _ranks(np.asarray(values, dtype=float))
    n = len(y)
    total = float(((y - y.mean()) ** 2).sum())
    result = []
    for path in paths:
        column = [config.get(path) for config in configs]
        labels, numeric = _groups(column, n)
        k = int(labels.max()) + 1 if n else 0
        spearman = None
        if numeric and n > 1:
            x = _ranks(np.asarray(column, dtype=float))
            if x.std() > 0 and y.std() > 0:
                spearman = round(float(np.corrcoef(x, y)[0, 1]), 4)
        if k < 2 or total == 0:
            result.append({"path": path, "importance": None, "spearman": spearman, "groups": k})
            continue
        means = np.bincount(labels, weights=y, minlength=k) / np.maximum(
            np.bincount(labels, minlength=k), 1)
        within = float(((y - means[labels]) ** 2).sum())
        between = total - within
        if n > k:
            share = (between - (k - 1) * within / (n - k)) / total
        else:  # one trial per group: nothing is left to tell noise from effect
            share = 0.0
        result.append({"path": path, "importance": round(max(0.0, float(share)), 4),
                       "spearman": spearman, "groups": k})
    return sorted(result, key=lambda r: (r["importance"] is None, -(r["importance"] or 0.0),
                                         r["path"]))


@router.get("/{sweep_id}/importance", response_model=ImportancePublic,
            responses={404: {"model": ErrorResponse}})
def sweep_importance(sweep_id: PathText, user: CurrentUser, session: SessionDep) -> Response:
    """How much the sweep's metric depends on each swept path, from its finished trials (those
    that succeeded or were stopped by the scheduler, with a value of the metric)."""
    view, board = sweeps.sweep_trials(session=session, sweep_id=sweep_id, owner=user)
    config = view.sweep.config
    paths = list(config.get("space") or {})
    used = [row for row in board if row["status"] in FINISHED and row["value"] is not None
            and math.isfinite(row["value"])]
    note = None
    parameters: list[dict[str, Any]] = []
    if len(used) < MIN_TRIALS:
        note = (f"{len(used)} finished trial(s) with a value of {config['scheduler']['metric']}; "
                f"an estimate needs {MIN_TRIALS}")
        parameters = [{"path": path, "importance": None, "spearman": None, "groups": 0}
                      for path in paths]
    else:
        parameters = first_order_importance([row["config"] for row in used],
                                            [row["value"] for row in used], paths)
    return model_response(ImportancePublic(
        sweep_id=view.sweep.id, metric=config["scheduler"]["metric"],
        mode=config["scheduler"]["mode"], method=METHOD, trials_used=len(used),
        parameters=[ParameterImportance(**p) for p in parameters], note=note))
