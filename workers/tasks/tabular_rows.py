"""A new entity's raw rows, as a ``tabular`` job's served task: parsed and checked against the
recipe its artifact records (:meth:`metaserve.workers.tasks.tabular.TabularFamily.recipe`),
scaled as in training, and its predictions returned in the target's own units.

Rows come in one of three forms, for the support set and the query set alike:

- named columns: ``{"x1": [...], "x2": [...], "y": [...]}``;
- a list of row objects: ``[{"x1": 0.3, "x2": 1.0, "y": 2.5}, ...]``;
- arrays in the recorded order: ``support_x`` ``[n, features]``, ``support_y`` ``[n]`` (one
  target) or ``[n, targets]``, ``query_x`` ``[m, features]``; with a time column, the rows are
  taken to be in time order.

Named rows hold every feature and, in the support set, the target(s); with a time column, the
time too (support rows must all precede query rows; each set is sorted by it). The task
column may be given and is ignored; any other column is refused, by name. With ``lags: k``
the first k support rows (in time) only serve as lags, and a query row's lags are the true
previous targets where the query rows hold the target column (one-step-ahead, as in
training), else the model's own predictions for the earlier query rows (a recursive forecast).

Classification: the support labels are the target's raw values; the task's classes are the
distinct support labels, numbered in the order of the table's classes (as in training), and
each query row's predicted label is returned as a raw value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from metaserve.workers.exceptions import RowsInvalid

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RowsTask:
    """One served task, scaled as in training. ``support_x``/``support_y`` are what the
    model adapts on; the query's scaled features are ``query_features`` (in time order, caller's
    row ``query_order[i]`` at position ``i``) and its lags are completed from ``history`` (the
    support's scaled targets) and ``query_targets`` (scaled true query targets, or None)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_features: np.ndarray
    query_order: np.ndarray
    history: np.ndarray
    query_targets: np.ndarray | None
    task_classes: list[Any] | None


def _columns(value: Any, field: str) -> dict[str, list[Any]]:
    """Named columns of equal length from a dict of columns or a list of row objects."""
    if isinstance(value, dict):
        columns = {}
        for name, column in value.items():
            if not isinstance(column, list):
                raise RowsInvalid(f"{field}.{name}", "a column is a list of values")
            columns[str(name)] = column
    elif isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        names = list(value[0])
        for index, row in enumerate(value):
            if set(row) != set(names):
                differ = sorted(set(row) ^ set(names))[0]
                raise RowsInvalid(f"{field}[{index}]", f"row {index} has not the columns of row 0 "
                                                       f"(column {differ!r})")
        columns = {str(name): [row[name] for row in value] for name in names}
    else:
        raise RowsInvalid(field, "expected named columns {column: [values]} or a list of row "
                                 "objects [{column: value}]")
    lengths = {len(column) for column in columns.values()}
    if len(lengths) > 1:
        raise RowsInvalid(field, f"columns of different lengths {sorted(lengths)}")
    if not lengths or 0 in lengths:
        raise RowsInvalid(field, "no rows")
    return columns


def _numbers(values: list[Any], field: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise RowsInvalid(field, "expected numbers") from None
    if array.ndim != 1 or any(isinstance(v, (bool, str)) for v in values):
        raise RowsInvalid(field, "expected numbers")
    if not np.isfinite(array).all():
        raise RowsInvalid(field, "finite numbers only (no NaN, no infinity, no missing value)")
    return array


def _labels(values: list[Any], classes: list[Any], field: str) -> np.ndarray:
    """Global class index of each raw label (as the table's categories or numbers)."""
    index = {(str(c) if isinstance(c, str) else float(c)): i for i, c in enumerate(classes)}
    found = []
    for value in values:
        key = value if isinstance(value, str) else (
            float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) else None)
        if key not in index:
            shown = ", ".join(repr(c) for c in classes[:20]) + (" ..." if len(classes) > 20 else "")
            raise RowsInvalid(field, f"label {value!r} is not one of the table's classes ({shown})")
        found.append(index[key])
    return np.asarray(found, dtype=np.int64)


def _check_names(columns: dict[str, list[Any]], required: list[str], allowed: set[str],
                 field: str) -> None:
    for name in required:
        if name not in columns:
            raise RowsInvalid(f"{field}.{name}", f"missing column {name!r} (expected "
                                                 f"{', '.join(repr(n) for n in required)})")
    for name in columns:
        if name not in allowed:
            raise RowsInvalid(f"{field}.{name}", f"unknown column {name!r}: the job's columns are "
                                                 f"{', '.join(repr(n) for n in required)}")


def _from_arrays(recipe: dict[str, Any], support_x: Any, support_y: Any, query_x: Any
                 ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Arrays in the recorded order as named columns (the time column: the row order)."""
    features, targets = recipe["features"], recipe["targets"]

    def matrix(value: Any, field: str, width: int) -> list[list[Any]]:
        if (not isinstance(value, list) or not value
                or not all(isinstance(row, list) and len(row) == width for row in value)):
            raise RowsInvalid(field, f"expected [rows, {width}]: one value per "
                                     f"{'feature' if field != 'support_y' else 'target'} in the "
                                     f"order {', '.join(repr(n) for n in (features if field != 'support_y' else targets))}")
        return value

    if isinstance(support_y, list) and support_y and not isinstance(support_y[0], list):
        support_y = [[value] for value in support_y]
    support_rows = matrix(support_x, "support_x", len(features))
    label_rows = matrix(support_y, "support_y", len(targets))
    if len(label_rows) != len(support_rows):
        raise RowsInvalid("support_y", f"{len(label_rows)} targets for {len(support_rows)} rows")
    query_rows = matrix(query_x, "query_x", len(features))
    support = {name: [row[i] for row in support_rows] for i, name in enumerate(features)}
    support.update({name: [row[i] for row in label_rows] for i, name in enumerate(targets)})
    query = {name: [row[i] for row in query_rows] for i, name in enumerate(features)}
    if recipe["time_column"] is not None:
        support[recipe["time_column"]] = list(range(len(support_rows)))
        query[recipe["time_column"]] = list(range(len(support_rows),
                                                  len(support_rows) + len(query_rows)))
    return support, query


def parse_rows(recipe: dict[str, Any], *, support: Any = None, query: Any = None,
               support_x: Any = None, support_y: Any = None, query_x: Any = None) -> RowsTask:
    """The served task of raw rows (see the module docstring); :class:`RowsInvalid` naming the
    field or column otherwise."""
    features, targets = list(recipe["features"]), list(recipe["targets"])
    time_column, lags = recipe["time_column"], int(recipe["lags"])
    classification = recipe["problem"] == "classification"
    if support is not None or query is not None:
        if support_x is not None or support_y is not None or query_x is not None:
            raise RowsInvalid("support", "give rows (support, query) or arrays (support_x, "
                                         "support_y, query_x), not both")
        if support is None or query is None:
            raise RowsInvalid("query" if support is not None else "support", "missing")
        support, query = _columns(support, "support"), _columns(query, "query")
    else:
        support, query = _from_arrays(recipe, support_x, support_y, query_x)
    timed = [time_column] if time_column is not None else []
    ignored = {recipe["task_column"]}
    _check_names(support, features + targets + timed, {*features, *targets, *timed, *ignored},
                 "support")
    query_allowed = {*features, *timed, *ignored, *(targets if lags else [])}
    _check_names(query, features + timed, query_allowed, "query")

    support_order = query_order = None
    if time_column is not None:
        support_time = _numbers(support[time_column], f"support.{time_column}")
        query_time = _numbers(query[time_column], f"query.{time_column}")
        if support_time.max() >= query_time.min():
            raise RowsInvalid(f"query.{time_column}", (
                f"every support row must precede every query row in time: the latest support "
                f"row is at {support_time.max():g}, the earliest query row at {query_time.min():g}"))
        support_order = np.argsort(support_time, kind="stable")
        query_order = np.argsort(query_time, kind="stable")
    rows = len(next(iter(support.values())))
    support_order = np.arange(rows) if support_order is None else support_order
    query_order = (np.arange(len(next(iter(query.values())))) if query_order is None
                   else query_order)

    mean, std = np.asarray(recipe["feature_mean"]), np.asarray(recipe["feature_std"])

    def scaled_features(columns: dict[str, list[Any]], field: str, order: np.ndarray) -> np.ndarray:
        if not features:
            return np.zeros((len(order), 0))
        raw = np.stack([_numbers(columns[name], f"{field}.{name}") for name in features], axis=1)
        return ((raw - mean) / std)[order]

    support_features = scaled_features(support, "support", support_order)
    query_features = scaled_features(query, "query", query_order)
    task_classes = None
    if classification:
        labels = _labels(support[targets[0]], recipe["classes"], f"support.{targets[0]}")[support_order]
        present = np.unique(labels)
        if len(present) != recipe["ways"]:
            raise RowsInvalid(f"support.{targets[0]}", (
                f"the support rows hold {len(present)} class(es); the job was trained on "
                f"{recipe['ways']}-way tasks: give rows of exactly {recipe['ways']} classes"))
        task_classes = [recipe["classes"][int(c)] for c in present]
        return RowsTask(support_x=torch.from_numpy(support_features),
                        support_y=torch.from_numpy(np.searchsorted(present, labels)),
                        query_features=query_features, query_order=query_order,
                        history=np.zeros((0, 1)), query_targets=None, task_classes=task_classes)
    target_mean, target_std = np.asarray(recipe["target_mean"]), np.asarray(recipe["target_std"])

    def scaled_targets(columns: dict[str, list[Any]], field: str, order: np.ndarray) -> np.ndarray:
        raw = np.stack([_numbers(columns[name], f"{field}.{name}") for name in targets], axis=1)
        return ((raw - target_mean) / target_std)[order]

    history = scaled_targets(support, "support", support_order)
    query_targets = (scaled_targets(query, "query", query_order)
                     if lags and all(name in query for name in targets) else None)
    if lags and any(name in query for name in targets) and query_targets is None:
        missing = next(name for name in targets if name not in query)
        raise RowsInvalid(f"query.{missing}", "give every target column in the query rows "
                                              "(true lags) or none (a recursive forecast)")
    if rows <= lags:
        raise RowsInvalid("support", f"{rows} support row(s); with lags={lags} the first {lags} "
                                     f"rows only serve as lags: give more than {lags}")
    support_x = np.concatenate([support_features, _lag_matrix(history, lags)], axis=1)[lags:]
    return RowsTask(support_x=torch.from_numpy(support_x),
                    support_y=torch.from_numpy(history[lags:]), query_features=query_features,
                    query_order=query_order, history=history, query_targets=query_targets,
                    task_classes=None)


def _lag_matrix(series: np.ndarray, lags: int) -> np.ndarray:
    """Row ``i``: ``series[i-1], ..., series[i-lags]`` (each all targets), zeros before the
    start (those rows are dropped by the caller)."""
    columns = []
    for lag in range(1, lags + 1):
        shifted = np.zeros_like(series)
        shifted[lag:] = series[:-lag]
        columns.append(shifted)
    return np.concatenate(columns, axis=1) if columns else np.zeros((len(series), 0))


def predict_rows(recipe: dict[str, Any], task: RowsTask, predictor: Predictor) -> dict[str, Any]:
    """The adapted ``predictor``'s predictions for the task's query rows, in the caller's row
    order: regression ``predictions`` ``[m, targets]`` in the targets' units; classification
    ``predictions`` ``[m, ways]`` logits (column ``j``: class ``classes[j]``) and ``labels``."""
    lags = int(recipe["lags"])
    if task.task_classes is not None or not lags:
        outputs = predictor(torch.from_numpy(task.query_features)).detach().double().numpy()
    elif task.query_targets is not None:  # one-step-ahead: the true previous targets
        series = np.concatenate([task.history, task.query_targets])
        inputs = np.concatenate([task.query_features,
                                 _lag_matrix(series, lags)[len(task.history):]], axis=1)
        outputs = predictor(torch.from_numpy(inputs)).detach().double().numpy()
    else:  # a recursive forecast: each query row's lags include earlier predictions
        series = list(task.history)
        predicted = []
        for features in task.query_features:
            lagged = np.concatenate([series[-lag] for lag in range(1, lags + 1)])
            row = torch.from_numpy(np.concatenate([features, lagged])[None, :])
            output = predictor(row).detach().double().numpy()[0]
            predicted.append(output)
            series.append(output)
        outputs = np.stack(predicted)
    restored = np.empty_like(outputs)
    restored[task.query_order] = outputs  # back to the caller's row order
    if task.task_classes is not None:
        labels = [task.task_classes[int(i)] for i in restored.argmax(axis=1)]
        return {"predictions": restored.tolist(), "labels": labels, "classes": task.task_classes,
                "targets": list(recipe["targets"])}
    units = restored * np.asarray(recipe["target_std"]) + np.asarray(recipe["target_mean"])
    return {"predictions": units.tolist(), "labels": None, "classes": None,
            "targets": list(recipe["targets"])}
