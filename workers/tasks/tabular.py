"""Task-grouped tables: one task per entity (patient, machine, firm), from an uploaded table.

The table's entities (the distinct values of ``task_column``) are split train/val/test by
entity id with :func:`~metaserve.workers.tasks.table_format.split_task_ids`, never by row, so
a meta-test task is always an entity the meta-learner never saw (as classes are split in
few-shot classification, Vinyals et al. 2016). A task of split ``s``:

- regression: ``support_shots + query_shots`` distinct rows of one entity of ``s``;
- classification (N-way K-shot within an entity): ``ways`` of the entity's own labels, each
  with ``support_shots + query_shots`` rows; the chosen labels are numbered 0..ways-1 in the
  order of their global class index (not a random permutation as for images: a table's
  classes usually mean the same thing in every entity, and a served task remaps its support
  labels the same way). Entities without ``ways`` labels of enough rows are excluded, counted;
- time series (``time_column``): a window of one entity's series. A cut point is drawn, the
  support set is the ``support_shots`` rows just before it and the query set the
  ``query_shots`` rows just after it, so every support row strictly precedes every query row
  in time (a cut between two rows of the same time is never drawn). ``lags: k`` adds the k
  previous targets of the same entity (in time) as features; rows without k predecessors
  only serve as lags. A query row's lags are the true previous targets (one-step-ahead
  forecasting, as an AR(k) model is evaluated); served, later query rows take earlier query
  predictions where the caller does not give the true values
  (:mod:`metaserve.workers.tasks.tabular_rows`).

Features and regression targets (and lags, in the target's units) are standardized with the
mean and standard deviation of the *training* entities' rows only: nothing of a validation or
test entity leaks into the data the meta-learner sees. The scalers, feature and target names
and classes are the family's :meth:`TabularFamily.recipe`, which travels in the artifact so a
new entity's raw rows can be adapted to and predictions returned in the target's own units.

Sampling is counter-based like every family's: task ``t`` of iteration ``i`` on split ``s``
draws all its random numbers from ``task_generator(seed, s, i, t)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from metaserve.workers.exceptions import DatasetError
from metaserve.workers.spec import TabularSpec
from metaserve.workers.tasks.base import SPLITS, TaskBatch, task_generator
from metaserve.workers.tasks.fewshot import episode_shots
from metaserve.workers.tasks.table_format import (CategoryColumn, check_table_spec,
                                                  read_canonical_table, split_task_ids)

logger = logging.getLogger(__name__)

RECIPE_KIND = "tabular"
MIN_STD = 1e-12
"""A feature constant over the training entities is centred but not scaled (std taken as 1)."""


@dataclass(frozen=True)
class SplitRows:
    """The usable rows of one split's entities, grouped by entity (sorted by time when there is
    a time column): ``x`` float32 [rows, inputs] standardized features then lags, ``y`` float32
    [rows, targets] standardized (regression) or long [rows] global class index
    (classification), ``time`` float64 [rows] or None, entity ``e``'s rows at
    ``offsets[e]:offsets[e + 1]``; ``entity_ids`` as the table holds them."""

    x: torch.Tensor
    y: torch.Tensor
    time: np.ndarray | None
    offsets: np.ndarray
    entity_ids: list[Any]

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass(frozen=True)
class EligibleTasks:
    """The entities (indices into a :class:`SplitRows`) that can make a task with given shots;
    for a time series, entity ``entities[i]``'s valid cut points (positions in its rows) are
    ``cuts[cut_offsets[i]:cut_offsets[i + 1]]``."""

    entities: np.ndarray
    cuts: np.ndarray | None
    cut_offsets: np.ndarray | None


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number JSON writes."""
    return value.item() if isinstance(value, np.generic) else value


def _standardizer(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (population), a std of ~0 taken as 1."""
    mean = values.mean(axis=0) if len(values) else np.zeros(values.shape[1])
    std = values.std(axis=0) if len(values) else np.ones(values.shape[1])
    return mean, np.where(std > MIN_STD, std, 1.0)


class TabularFamily:
    """Tasks from a canonical table (see the module docstring). ``directory``: a canonical
    table directory (:func:`~metaserve.workers.tasks.table_format.write_canonical_table`, as
    tests and benchmarks make one); by default the uploaded dataset ``spec.dataset`` is
    fetched from the artifact store."""

    def __init__(self, spec: TabularSpec, *, directory: str | Path | None = None):
        if directory is None:
            from metaserve.workers.tasks.uploaded import fetch_table

            directory = fetch_table(spec.dataset)
        meta, columns = read_canonical_table(directory)
        self.spec = spec = check_table_spec(spec, meta)
        self.is_classification = spec.problem == "classification"
        self.input_shape: tuple[int] = spec.input_shape
        self.output_dim: int = spec.output_dim
        self.features: list[str] = list(spec.features or [])
        self.targets: list[str] = spec.targets
        self._build(columns)
        self._eligible: dict[tuple[str, int], EligibleTasks] = {}
        self.excluded: dict[str, int] = {}
        for split in SPLITS:  # fail now, not at the first evaluation, if a split has no task
            self._eligible_tasks(split, spec.support_shots)

    # ------------------------------------------------------------------ the table

    def _build(self, columns: dict[str, Any]) -> None:
        spec = self.spec
        task = columns[spec.task_column]
        if isinstance(task, CategoryColumn):
            entity_ids, present = task.codes.astype(np.float64), task.codes >= 0
            names = task.categories
            entity_name = lambda value: names[int(value)]  # noqa: E731
        else:
            entity_ids, present = np.asarray(task, dtype=np.float64), ~np.isnan(task)
            entity_name = int
        # The split is over every entity of the table, whatever rows are dropped below, so it
        # is the one the submit check counted (split_task_counts).
        splits = split_task_ids(entity_ids[present], spec.split, spec.split_seed)

        features = np.stack([np.asarray(columns[name], dtype=np.float64) for name in self.features],
                            axis=1) if self.features else np.zeros((len(entity_ids), 0))
        if self.is_classification:
            labels, self.classes = _class_index(columns[self.targets[0]])
            targets = labels[:, None].astype(np.float64)
            targets[labels < 0] = np.nan
        else:
            self.classes = None
            targets = np.stack([np.asarray(columns[name], dtype=np.float64)
                                for name in self.targets], axis=1)
        time = (np.asarray(columns[spec.time_column], dtype=np.float64)
                if spec.time_column is not None else None)
        usable = present & np.isfinite(features).all(axis=1) & np.isfinite(targets).all(axis=1)
        if time is not None:
            usable &= np.isfinite(time)
        self.skipped_rows = int(present.sum() - usable.sum())  # on_invalid: skip (else refused)
        if self.skipped_rows:
            logger.warning("%d rows with missing or infinite values are not used",
                           self.skipped_rows, extra={"dataset": spec.dataset})

        train_rows = usable & np.isin(entity_ids, splits["train"])
        self.feature_mean, self.feature_std = _standardizer(features[train_rows])
        if self.is_classification:
            self.target_mean, self.target_std = np.zeros(1), np.ones(1)
        else:
            self.target_mean, self.target_std = _standardizer(targets[train_rows])
        scaled_features = (features - self.feature_mean) / self.feature_std
        scaled_targets = (targets if self.is_classification
                          else (targets - self.target_mean) / self.target_std)

        self.splits: dict[str, SplitRows] = {}
        for split in SPLITS:
            rows = np.flatnonzero(usable & np.isin(entity_ids, splits[split]))
            order_in_entity = time[rows] if time is not None else rows.astype(np.float64)
            rows = rows[np.lexsort((rows, order_in_entity, entity_ids[rows]))]
            ids, starts = np.unique(entity_ids[rows], return_index=True)
            offsets = np.append(starts, len(rows))
            x, y = scaled_features[rows], scaled_targets[rows]
            keep = np.ones(len(rows), dtype=bool)
            if spec.lags:
                x, keep = _with_lags(x, y, offsets, spec.lags)
            rows, x, y = rows[keep], x[keep], y[keep]
            offsets = np.append(0, np.cumsum(keep))[offsets]  # kept rows before each entity
            self.splits[split] = SplitRows(
                x=torch.from_numpy(x.astype(np.float32)),
                y=(torch.from_numpy(y[:, 0].astype(np.int64)) if self.is_classification
                   else torch.from_numpy(y.astype(np.float32))),
                time=time[rows] if time is not None else None,
                offsets=offsets, entity_ids=[entity_name(i) for i in ids])

    # ------------------------------------------------------------------ which tasks exist

    def _eligible_tasks(self, split: str, support_shots: int) -> "EligibleTasks":
        """The entities of ``split`` that can make a task with these shots (and, for a time
        series, their valid cut points)."""
        key = (split, support_shots)
        if key in self._eligible:
            return self._eligible[key]
        rows, spec = self.splits[split], self.spec
        needed = support_shots + spec.query_shots
        cuts = None
        if self.is_classification:
            entities = np.array([e for e in range(len(rows.entity_ids))
                                 if len(self._task_classes(rows, e, needed)) >= spec.ways],
                                dtype=np.int64)
            why = f"{spec.ways} labels with at least {needed} rows each"
        elif rows.time is not None:
            cuts = [_valid_cuts(rows.time[rows.offsets[e]:rows.offsets[e + 1]], support_shots,
                                spec.query_shots) for e in range(len(rows.entity_ids))]
            entities = np.array([e for e, found in enumerate(cuts) if len(found)], dtype=np.int64)
            cuts = [cuts[e] for e in entities]
            why = (f"{needed} rows{f' after their first {spec.lags} (lags)' if spec.lags else ''}"
                   f" with a time step between the support's {support_shots} and the query's "
                   f"{spec.query_shots}")
        else:
            entities = np.flatnonzero(rows.sizes >= needed).astype(np.int64)
            why = f"at least {needed} rows (support {support_shots} + query {spec.query_shots})"
        excluded = len(rows.entity_ids) - len(entities)
        if excluded:
            logger.warning("%d of the %d %s entities cannot make a task and are not sampled",
                           excluded, len(rows.entity_ids), split,
                           extra={"dataset": spec.dataset, "needs": why})
        if support_shots == spec.support_shots:
            self.excluded[split] = excluded
        if not len(entities):
            raise DatasetError(f"dataset {spec.dataset}: none of the {len(rows.entity_ids)} "
                               f"entities of the {split} split has {why}")
        self._eligible[key] = EligibleTasks(
            entities=entities,
            cuts=None if cuts is None else np.concatenate(cuts).astype(np.int64),
            cut_offsets=None if cuts is None else np.append(0, np.cumsum([len(c) for c in cuts])))
        return self._eligible[key]

    def _task_classes(self, rows: SplitRows, entity: int, needed: int) -> np.ndarray:
        """The global class indices of ``entity`` with at least ``needed`` rows, ascending."""
        labels = rows.y[rows.offsets[entity]:rows.offsets[entity + 1]].numpy()
        classes, counts = np.unique(labels, return_counts=True)
        return classes[counts >= needed]

    # ------------------------------------------------------------------ sampling

    def sample(self, *, seed: int, split: str, iteration: int, task_indices: Sequence[int],
               support_shots: int | None = None) -> TaskBatch:
        """Tasks ``task_indices`` of ``iteration`` on ``split``: x float32 ``[T, n, inputs]``;
        y float32 ``[T, n, targets]`` (regression) or long ``[T, n]`` in [0, ways)."""
        support = episode_shots(split, self.spec.support_shots, support_shots)
        query = self.spec.query_shots
        rows = self.splits[split]
        eligible = self._eligible_tasks(split, support)
        support_rows, query_rows, labels = [], [], []
        for task_index in task_indices:
            generator = task_generator(seed, split, iteration, task_index)
            pick = int(torch.randint(len(eligible.entities), (1,), generator=generator))
            entity = int(eligible.entities[pick])
            start, end = int(rows.offsets[entity]), int(rows.offsets[entity + 1])
            if self.is_classification:
                chosen_rows, task_labels = self._classification_rows(
                    rows, entity, support + query, generator)
                # query rows first in each class's draw, so they do not depend on the shots
                query_rows.append(chosen_rows[:, :query].reshape(-1))
                support_rows.append(chosen_rows[:, query:].reshape(-1))
                labels.append(task_labels)
            elif eligible.cuts is not None:
                low, high = (int(v) for v in eligible.cut_offsets[pick:pick + 2])
                cut = start + int(eligible.cuts[low + int(torch.randint(high - low, (1,),
                                                                        generator=generator))])
                support_rows.append(torch.arange(cut - support, cut))
                query_rows.append(torch.arange(cut, cut + query))
            else:
                order = start + torch.randperm(end - start, generator=generator)
                query_rows.append(order[:query])
                support_rows.append(order[query:query + support])
        if not support_rows:
            width = support * (self.spec.ways or 1) if self.is_classification else support
            empty_y = (torch.empty(0, width, dtype=torch.long) if self.is_classification
                       else torch.empty(0, width, len(self.targets)))
            return TaskBatch(torch.empty(0, width, *self.input_shape), empty_y,
                             torch.empty(0, 0, *self.input_shape), empty_y[:, :0])
        support_index, query_index = torch.stack(support_rows), torch.stack(query_rows)
        if self.is_classification:
            label_rows = torch.stack(labels)  # [T, ways]: each class's task label
            support_y = label_rows.repeat_interleave(support, dim=1)
            query_y = label_rows.repeat_interleave(query, dim=1)
        else:
            support_y, query_y = rows.y[support_index], rows.y[query_index]
        return TaskBatch(rows.x[support_index], support_y, rows.x[query_index], query_y)

    def _classification_rows(self, rows: SplitRows, entity: int, shots: int,
                             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``([ways, shots] row indices, [ways] task labels)``: ``ways`` of the entity's classes
        with enough rows, labelled 0..ways-1 in ascending global class order."""
        start = int(rows.offsets[entity])
        labels = rows.y[start:int(rows.offsets[entity + 1])]
        candidates = self._task_classes(rows, entity, shots)
        picked = torch.randperm(len(candidates), generator=generator)[:self.spec.ways]
        chosen = np.sort(candidates[picked.numpy()])
        drawn = []
        for global_class in chosen.tolist():
            members = start + torch.nonzero(labels == global_class).flatten()
            drawn.append(members[torch.randperm(len(members), generator=generator)[:shots]])
        return torch.stack(drawn), torch.arange(self.spec.ways)

    # ------------------------------------------------------------------ the recipe

    def recipe(self) -> dict[str, Any]:
        """What a served task needs to turn a new entity's raw rows into this family's inputs
        and predictions back into the target's units (recorded in ``meta_init.json``)."""
        spec = self.spec
        return {
            "kind": RECIPE_KIND,
            "features": list(self.features),
            "targets": list(self.targets),
            "problem": spec.problem,
            "classes": None if self.classes is None else [_plain(c) for c in self.classes],
            "ways": spec.ways,
            "feature_mean": [float(v) for v in self.feature_mean],
            "feature_std": [float(v) for v in self.feature_std],
            "target_mean": None if self.is_classification else [float(v) for v in self.target_mean],
            "target_std": None if self.is_classification else [float(v) for v in self.target_std],
            "task_column": spec.task_column,
            "time_column": spec.time_column,
            "lags": spec.lags,
            "support_shots": spec.support_shots,
            "query_shots": spec.query_shots,
        }


def _class_index(column: Any) -> tuple[np.ndarray, list[Any]]:
    """``(class index per row, -1 where missing; the classes in index order)`` of a label
    column: a category column's categories, or a number column's distinct values."""
    if isinstance(column, CategoryColumn):
        return np.asarray(column.codes, dtype=np.int64), list(column.categories)
    values = np.asarray(column, dtype=np.float64)
    finite = np.isfinite(values)
    classes = np.unique(values[finite])
    index = np.full(len(values), -1, dtype=np.int64)
    index[finite] = np.searchsorted(classes, values[finite])
    integral = bool(np.all(classes == np.round(classes)))
    return index, [int(c) if integral else float(c) for c in classes]


def _with_lags(x: np.ndarray, y: np.ndarray, offsets: np.ndarray, lags: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """``x`` with the ``lags`` previous targets of the same entity appended (lag 1 first, each
    lag all targets), and which rows have that many predecessors (the others only serve as
    lags). Rows are grouped by entity at ``offsets`` and sorted by time within it."""
    position = np.arange(len(x)) - np.repeat(offsets[:-1], np.diff(offsets))
    keep = position >= lags
    lagged = [np.roll(y, lag, axis=0) for lag in range(1, lags + 1)]
    return np.concatenate([x, *lagged], axis=1), keep


def _valid_cuts(time: np.ndarray, support: int, query: int) -> np.ndarray:
    """Positions ``c`` in a time-sorted series where ``support`` rows end before ``c`` and
    ``query`` rows start at it, and row ``c`` is strictly later than row ``c - 1``."""
    cuts = np.arange(support, len(time) - query + 1)
    return cuts[time[cuts] > time[cuts - 1]] if len(cuts) else cuts
