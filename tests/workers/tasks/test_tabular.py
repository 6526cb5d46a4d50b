"""The ``tabular`` task family on generated tables: entities are split by id, scalers see
training entities only, time-series tasks never look ahead, lags are the previous targets,
sampling is counter-based, classification remaps each task's own labels; and the served side
(raw rows in, the target's units out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metaserve.workers.exceptions import RowsInvalid
from metaserve.workers.spec import TabularSpec
from metaserve.workers.tasks.tabular import TabularFamily
from metaserve.workers.tasks.tabular_rows import parse_rows, predict_rows
from metaserve.workers.tasks.table_format import split_task_ids, write_canonical_table

DATASET = "ds_" + "0" * 26
ENTITIES, ROWS = 60, 30


def entity_table(seed: int = 0, entities: int = ENTITIES, rows: int = ROWS) -> dict[str, np.ndarray]:
    """Each entity its own nonlinear function of three features, observed at times 0..rows-1
    (rows shuffled, so order in the file is not time order); ``eid`` and ``tcopy`` copy the
    entity and the time as features so tests can see where a sampled row came from."""
    rng = np.random.default_rng(seed)
    entity = np.repeat(np.arange(entities), rows)
    time = np.tile(np.arange(rows), entities).astype(np.float64)
    x = rng.normal(size=(entities * rows, 3))
    amplitude, phase, slope = (rng.uniform(0.5, 2.0, entities), rng.uniform(0, np.pi, entities),
                               rng.uniform(-1, 1, entities))
    y = amplitude[entity] * np.sin(x.sum(axis=1) + phase[entity]) + slope[entity] * x[:, 1] ** 2
    order = rng.permutation(len(entity))
    return {"entity": np.array([f"e{i:03d}" for i in entity], dtype=object)[order],
            "t": time[order], "x1": x[order, 0], "x2": x[order, 1], "x3": x[order, 2],
            "eid": entity[order].astype(np.float64), "tcopy": time[order], "y": y[order]}


def write(directory: Path, columns: dict[str, np.ndarray]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_canonical_table(directory, columns, source_format="csv")
    return directory


@pytest.fixture
def table_dir(tmp_path: Path) -> Path:
    return write(tmp_path / "table", entity_table())


def spec(**fields) -> TabularSpec:
    return TabularSpec(**{"dataset": DATASET, "task_column": "entity", "target": "y",
                          "features": ["x1", "x2", "x3", "eid", "tcopy"], **fields})


def entities_of(family: TabularFamily, split: str) -> set:
    return set(family.splits[split].entity_ids)


def test_entities_are_split_by_id_never_by_row(table_dir: Path):
    family = TabularFamily(spec(), directory=table_dir)
    splits = {split: entities_of(family, split) for split in ("train", "val", "test")}
    assert not splits["train"] & splits["val"] and not splits["train"] & splits["test"]
    assert not splits["val"] & splits["test"]
    assert set.union(*splits.values()) == {f"e{i:03d}" for i in range(ENTITIES)}
    expected = split_task_ids(np.arange(ENTITIES), (0.7, 0.15, 0.15), 0)  # the one split
    assert splits["test"] == {f"e{i:03d}" for i in expected["test"]}
    # every sampled row of a test task belongs to a test entity
    batch = family.sample(seed=0, split="test", iteration=0, task_indices=range(20))
    eid_column = family.features.index("eid")
    eids = batch.support_x[..., eid_column] * family.feature_std[eid_column] + family.feature_mean[eid_column]
    assert {f"e{int(round(v)):03d}" for v in eids.flatten().tolist()} <= splits["test"]


def test_scalers_are_fitted_on_training_entities_only(tmp_path: Path):
    columns = entity_table()
    base = TabularFamily(spec(), directory=write(tmp_path / "base", columns)).recipe()
    family = TabularFamily(spec(), directory=write(tmp_path / "probe", columns))
    test_entity, train_entity = sorted(entities_of(family, "test"))[0], sorted(entities_of(family, "train"))[0]

    def changed(entity: str) -> dict:
        altered = {name: values.copy() for name, values in columns.items()}
        rows = altered["entity"] == entity
        altered["x1"][rows] *= 100.0
        altered["y"][rows] += 1000.0
        return TabularFamily(spec(), directory=write(tmp_path / entity, altered)).recipe()

    after_test_change = changed(test_entity)
    for key in ("feature_mean", "feature_std", "target_mean", "target_std"):
        assert after_test_change[key] == base[key]
    after_train_change = changed(train_entity)  # the probe can see a change where there is one
    assert after_train_change["feature_std"][0] > base["feature_std"][0]
    assert after_train_change["target_mean"][0] > base["target_mean"][0]


def test_time_series_support_rows_precede_query_rows(tmp_path: Path):
    columns = entity_table()
    columns["t"] = np.floor(columns["t"] / 2)  # pairs of rows share a time: no cut between them
    columns["tcopy"] = columns["t"].copy()
    family = TabularFamily(spec(time_column="t", support_shots=5, query_shots=4),
                           directory=write(tmp_path / "ties", columns))
    column = family.features.index("tcopy")
    for split in ("train", "val", "test"):
        batch = family.sample(seed=1, split=split, iteration=3, task_indices=range(200))
        support_t, query_t = batch.support_x[..., column], batch.query_x[..., column]
        assert bool((support_t.max(dim=1).values < query_t.min(dim=1).values).all())
        # a window: support rows consecutive in time, the query right after
        assert bool((support_t.diff(dim=1) >= 0).all()) and bool((query_t.diff(dim=1) >= 0).all())


def test_lags_are_the_previous_targets_of_the_same_entity(tmp_path: Path):
    columns = entity_table()
    family = TabularFamily(spec(time_column="t", lags=3), directory=write(tmp_path / "lags", columns))
    assert family.input_shape == (5 + 3,)
    truth = {(int(e), int(t)): y for e, t, y in zip(columns["eid"], columns["t"], columns["y"])}
    recipe = family.recipe()
    batch = family.sample(seed=0, split="train", iteration=0, task_indices=range(30))
    for x in (batch.support_x.reshape(-1, 8), batch.query_x.reshape(-1, 8)):
        raw = x[:, :5].double().numpy() * recipe["feature_std"] + recipe["feature_mean"]
        lagged = x[:, 5:].double().numpy() * recipe["target_std"][0] + recipe["target_mean"][0]
        for (eid, time), lags in zip(np.round(raw[:, 3:5]).astype(int), lagged):
            assert time >= 3  # rows without three predecessors only serve as lags
            expected = [truth[(eid, time - lag)] for lag in (1, 2, 3)]
            assert lags == pytest.approx(expected, abs=1e-5)


def test_sampling_is_the_same_whichever_shard_samples_a_task(table_dir: Path):
    for kind in ({}, {"time_column": "t", "lags": 2}):
        family = TabularFamily(spec(**kind), directory=table_dir)
        whole = family.sample(seed=5, split="train", iteration=9, task_indices=range(8))
        shard = family.sample(seed=5, split="train", iteration=9, task_indices=[6, 7])
        again = TabularFamily(spec(**kind), directory=table_dir).sample(
            seed=5, split="train", iteration=9, task_indices=range(8))
        for full, part, repeat in zip(whole, shard, again):
            assert torch.equal(full[6:], part) and torch.equal(full, repeat)
        other = family.sample(seed=5, split="train", iteration=10, task_indices=range(8))
        assert not torch.equal(whole.query_y, other.query_y)


def test_query_rows_do_not_depend_on_the_support_shots(table_dir: Path):
    family = TabularFamily(spec(), directory=table_dir)
    five = family.sample(seed=0, split="val", iteration=0, task_indices=range(4), support_shots=5)
    ten = family.sample(seed=0, split="val", iteration=0, task_indices=range(4), support_shots=10)
    assert five.support_x.shape[1] == 5 and ten.support_x.shape[1] == 10
    assert torch.equal(five.query_x, ten.query_x)


def classification_table(entities: int = 40, rows_per_class: int = 8) -> dict[str, np.ndarray]:
    """Entity e has classes e%5, (e+1)%5, (e+2)%5 of five; entities 0..3 have only 3 rows of
    their third class. ``label_copy`` copies the global class so tests can see it."""
    rng = np.random.default_rng(0)
    entity, label = [], []
    for e in range(entities):
        for offset in range(3):
            count = 3 if (offset == 2 and e < 4) else rows_per_class
            entity += [e] * count
            label += [(e + offset) % 5] * count
    entity, label = np.array(entity), np.array(label)
    names = np.array(["ant", "bee", "cat", "dog", "eel"], dtype=object)
    return {"entity": entity.astype(np.float64), "x1": rng.normal(size=len(entity)),
            "label_copy": label.astype(np.float64), "kind": names[label]}


def test_classification_tasks_use_each_entitys_own_labels_remapped(tmp_path: Path):
    directory = write(tmp_path / "classes", classification_table())
    family = TabularFamily(TabularSpec(dataset=DATASET, task_column="entity", target="kind",
                                       features=["x1", "label_copy"], problem="classification",
                                       ways=3, support_shots=2, query_shots=3), directory=directory)
    assert family.output_dim == 3 and family.recipe()["classes"] == ["ant", "bee", "cat", "dog", "eel"]
    small = {e for e in range(4)}
    excluded = {split: len(set(family.splits[split].entity_ids) & small) for split in family.splits}
    assert family.excluded == excluded and sum(excluded.values()) == 4  # counted, not sampled
    column = family.features.index("label_copy")
    recipe = family.recipe()
    batch = family.sample(seed=0, split="train", iteration=0, task_indices=range(50))
    assert batch.support_y.shape == (50, 6) and batch.query_y.shape == (50, 9)
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        classes = torch.round(x[..., column] * recipe["feature_std"][column]
                              + recipe["feature_mean"][column]).long()
        for task_classes, task_labels in zip(classes, y):
            chosen = sorted(set(task_classes.tolist()))
            assert len(chosen) == 3
            # labels 0..2 in ascending global class order
            assert task_labels.tolist() == [chosen.index(c) for c in task_classes.tolist()]


# --------------------------------------------------------------------------- served rows


def regression_recipe(lags: int = 0, time_column: str | None = None) -> dict:
    return {"kind": "tabular", "features": ["a", "b"], "targets": ["y"], "problem": "regression",
            "classes": None, "ways": None, "feature_mean": [1.0, -2.0], "feature_std": [2.0, 4.0],
            "target_mean": [10.0], "target_std": [5.0], "task_column": "entity",
            "time_column": time_column, "lags": lags, "support_shots": 3, "query_shots": 2}


def test_named_columns_row_objects_and_arrays_give_the_same_task():
    recipe = regression_recipe()
    columns = parse_rows(recipe, support={"a": [3.0, 5.0], "b": [2.0, 6.0], "y": [15.0, 20.0]},
                         query={"a": [1.0], "b": [-2.0]})
    rows = parse_rows(recipe, support=[{"a": 3.0, "b": 2.0, "y": 15.0}, {"a": 5.0, "b": 6.0, "y": 20.0}],
                      query=[{"a": 1.0, "b": -2.0}])
    arrays = parse_rows(recipe, support_x=[[3.0, 2.0], [5.0, 6.0]], support_y=[15.0, 20.0],
                        query_x=[[1.0, -2.0]])
    for task in (rows, arrays):
        assert torch.equal(task.support_x, columns.support_x)
        assert torch.equal(task.support_y, columns.support_y)
        assert np.array_equal(task.query_features, columns.query_features)
    assert columns.support_x.tolist() == [[1.0, 1.0], [2.0, 2.0]]  # (raw - mean) / std
    assert columns.support_y.tolist() == [[1.0], [2.0]]
    result = predict_rows(recipe, columns, lambda x: torch.full((len(x), 1), 0.5, dtype=torch.float64))
    assert result["predictions"] == [[12.5]]  # 0.5 · 5 + 10: the target's units


@pytest.mark.parametrize(("support", "query", "field"), [
    ({"a": [1.0], "y": [1.0]}, {"a": [1.0], "b": [1.0]}, "support.b"),
    ({"a": [1.0], "b": [1.0], "y": [1.0], "z": [1.0]}, {"a": [1.0], "b": [1.0]}, "support.z"),
    ({"a": [1.0], "b": [1.0], "y": [1.0]}, {"a": [1.0], "B": [1.0], "b": [1.0]}, "query.B"),
    ({"a": [1.0], "b": [1.0]}, {"a": [1.0], "b": [1.0]}, "support.y"),
    ({"a": [1.0], "b": ["x"], "y": [1.0]}, {"a": [1.0], "b": [1.0]}, "support.b"),
    ({"a": [1.0], "b": [float("nan")], "y": [1.0]}, {"a": [1.0], "b": [1.0]}, "support.b"),
])
def test_rows_that_do_not_fit_the_recipe_name_the_column(support, query, field):
    with pytest.raises(RowsInvalid) as raised:
        parse_rows(regression_recipe(), support=support, query=query)
    assert raised.value.field == field


def test_served_time_series_refuses_support_after_query_and_sorts_by_time():
    recipe = regression_recipe(time_column="t")
    with pytest.raises(RowsInvalid) as raised:
        parse_rows(recipe, support={"a": [1.0], "b": [1.0], "y": [1.0], "t": [5.0]},
                   query={"a": [1.0], "b": [1.0], "t": [5.0]})
    assert raised.value.field == "query.t"
    task = parse_rows(recipe, support={"a": [5.0, 3.0], "b": [2.0, 6.0], "y": [15.0, 20.0],
                                       "t": [2.0, 1.0]},
                      query={"a": [1.0, 3.0], "b": [-2.0, 2.0], "t": [9.0, 8.0]})
    assert task.support_x.tolist() == [[1.0, 2.0], [2.0, 1.0]]  # time order: t=1 first
    result = predict_rows(recipe, task, lambda x: x[:, :1])  # predicts its first feature
    assert result["predictions"] == [[10.0], [15.0]]  # in the caller's order, not time order


def test_served_lags_come_from_the_support_then_true_or_predicted_query_targets():
    recipe = regression_recipe(lags=2, time_column="t")
    support = {"a": [1.0] * 4, "b": [-2.0] * 4, "y": [10.0, 15.0, 20.0, 25.0], "t": [0, 1, 2, 3]}
    query = {"a": [1.0] * 2, "b": [-2.0] * 2, "t": [4, 5]}
    task = parse_rows(recipe, support=support, query=query)
    # scaled y: 0, 1, 2, 3; the first two rows only serve as lags
    assert task.support_x[:, 2:].tolist() == [[1.0, 0.0], [2.0, 1.0]]
    assert task.support_y.tolist() == [[2.0], [3.0]]
    lag_one = lambda x: x[:, 2:3]  # noqa: E731 - predicts its previous target
    recursive = predict_rows(recipe, task, lag_one)["predictions"]
    assert recursive == [[25.0], [25.0]]  # row 5's lag is row 4's prediction
    true_lags = parse_rows(recipe, support=support, query={**query, "y": [40.0, 0.0]})
    assert predict_rows(recipe, true_lags, lag_one)["predictions"] == [[25.0], [40.0]]


def test_served_classification_maps_raw_labels_both_ways():
    recipe = {**regression_recipe(), "problem": "classification", "targets": ["kind"],
              "classes": ["ant", "bee", "cat"], "ways": 2, "target_mean": None, "target_std": None}
    task = parse_rows(recipe, support={"a": [1.0, 1.0, 1.0], "b": [1.0, 1.0, 1.0],
                                       "kind": ["cat", "ant", "cat"]},
                      query={"a": [1.0, 1.0], "b": [1.0, 1.0]})
    assert task.support_y.tolist() == [1, 0, 1] and task.task_classes == ["ant", "cat"]
    logits = lambda x: torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # noqa: E731
    assert predict_rows(recipe, task, logits)["labels"] == ["cat", "ant"]
    with pytest.raises(RowsInvalid) as raised:
        parse_rows(recipe, support={"a": [1.0], "b": [1.0], "kind": ["dog"]},
                   query={"a": [1.0], "b": [1.0]})
    assert raised.value.field == "support.kind"


# --------------------------------------------------------------------------- engine and cost


def held_out_rows(columns: dict[str, np.ndarray], entity: str, timed: bool
                  ) -> tuple[dict, dict, np.ndarray]:
    """An entity's first 10 rows in time as raw support rows, the next 20 as query rows."""
    rows = columns["entity"] == entity
    order = np.argsort(columns["t"][rows])
    picked = {name: values[rows][order] for name, values in columns.items()}
    names = ["x1", "x2", "x3"] + (["t"] if timed else [])
    return ({name: picked[name][:10].tolist() for name in names + ["y"]},
            {name: picked[name][10:30].tolist() for name in names}, picked["y"][10:30])


@pytest.fixture
def one_torch_thread():
    """The threads ``metaserve train`` gives a one-worker job: on a shared 2-core machine
    torch's default (every core) ran these 300 iterations 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("series", [{}, {"time_column": "t", "lags": 2}], ids=["rows", "series"])
def test_maml_on_a_table_adapts_to_held_out_entities_raw_rows(tmp_path: Path, monkeypatch, series,
                                                              one_torch_thread):
    import metaserve.workers.tasks.uploaded as uploaded
    from metaserve.workers.engine.final_artifact import load_meta_init
    from metaserve.workers.engine.trainer import Trainer

    columns = entity_table(entities=200, rows=40)
    write(tmp_path / DATASET, columns)
    monkeypatch.setattr(uploaded, "_cache_root", lambda: tmp_path)  # as if fetched before
    job = {"algorithm": {"name": "maml", "inner_lr": 0.1, "inner_steps": 3},
           "task_family": {"name": "tabular", "dataset": DATASET, "task_column": "entity",
                           "target": "y", **series},  # features: every other numeric column
           "meta_batch_size": 10, "iterations": 300, "outer_optimizer": {"lr": 0.003},
           "evaluation": {"every": 0, "tasks": 50, "inner_steps": [3]}, "checkpoint_every": 300}
    trainer = Trainer(job)
    resolved = ["x1", "x2", "x3", "eid", "tcopy"] if series else ["t", "x1", "x2", "x3", "eid", "tcopy"]
    assert trainer.spec.task_family.features == resolved  # the table's order, time excluded
    trainer.run(tmp_path / "job")
    model, recipe = load_meta_init(tmp_path / "job")
    assert recipe["data"] == trainer.family.recipe()
    features = recipe["data"]["features"]
    adapted, unadapted = [], []
    for entity in trainer.family.splits["test"].entity_ids:
        support, query, truth = held_out_rows(columns, entity, bool(series))
        rows = columns["entity"] == entity
        for name in features:  # the copies of entity and time the table holds
            support.setdefault(name, [float(columns[name][rows][0])] * 10)
            query.setdefault(name, [float(columns[name][rows][0])] * 20)
        for steps, errors in ((None, adapted), (0, unadapted)):
            predicted = np.array(model.adapt_rows(support=support, query=query, steps=steps)["predictions"])
            errors.append(float(np.mean((predicted[:, 0] - truth) ** 2)))
    assert np.mean(adapted) < 0.8 * np.mean(unadapted)


def test_a_tabular_job_is_costed_as_an_mlp_on_its_inputs_and_outputs():
    from metaserve.workers.cost import estimate
    from metaserve.workers.spec import JobSpec

    regression = JobSpec.model_validate({
        "algorithm": {"name": "maml"}, "task_family": {
            "name": "tabular", "dataset": DATASET, "task_column": "entity", "target": ["y", "z"],
            "features": ["a", "b", "c"], "time_column": "t", "lags": 2}})
    cost = estimate(regression)
    inputs = 3 + 2 * 2
    assert cost.parameters == (inputs * 40 + 40) + (40 * 40 + 40) + (40 * 2 + 2)
    assert cost.task_bytes == (10 + 10) * inputs * 4
    classification = JobSpec.model_validate({
        "algorithm": {"name": "maml"}, "task_family": {
            "name": "tabular", "dataset": DATASET, "task_column": "entity", "target": "kind",
            "features": ["a"], "problem": "classification", "ways": 3, "support_shots": 2,
            "query_shots": 4}})
    assert estimate(classification).task_bytes == 3 * (2 + 4) * 1 * 4


def test_rows_with_missing_values_are_skipped_and_counted_when_the_spec_says_so(tmp_path: Path):
    columns = entity_table()
    columns["x1"][:7] = np.nan
    columns["y"][10:12] = np.inf
    directory = write(tmp_path / "holes", columns)
    family = TabularFamily(spec(on_invalid="skip"), directory=directory)
    assert family.skipped_rows == 9
    assert sum(len(rows.x) for rows in family.splits.values()) == ENTITIES * ROWS - 9
    batch = family.sample(seed=0, split="train", iteration=0, task_indices=range(40))
    assert all(bool(torch.isfinite(part).all()) for part in batch)


def test_maml_classifies_a_held_out_entitys_rows_into_its_raw_labels(tmp_path: Path, monkeypatch,
                                                                     one_torch_thread):
    import metaserve.workers.tasks.uploaded as uploaded
    from metaserve.workers.engine.final_artifact import load_meta_init
    from metaserve.workers.engine.trainer import Trainer

    columns = classification_table()
    write(tmp_path / DATASET, columns)
    monkeypatch.setattr(uploaded, "_cache_root", lambda: tmp_path)
    job = {"algorithm": {"name": "maml", "inner_lr": 0.5, "inner_steps": 1},
           "task_family": {"name": "tabular", "dataset": DATASET, "task_column": "entity",
                           "target": "kind", "features": ["x1", "label_copy"],
                           "problem": "classification", "ways": 3, "support_shots": 2,
                           "query_shots": 3},
           "meta_batch_size": 4, "iterations": 5, "evaluation": {"every": 0, "tasks": 8}}
    Trainer(job).run(tmp_path / "job")
    model, recipe = load_meta_init(tmp_path / "job")
    assert recipe["data"]["classes"] == ["ant", "bee", "cat", "dog", "eel"]
    result = model.adapt_rows(
        support={"x1": [0.0] * 6, "label_copy": [1.0, 1.0, 3.0, 3.0, 4.0, 4.0],
                 "kind": ["bee", "bee", "dog", "dog", "eel", "eel"]},
        query={"x1": [0.0, 0.0], "label_copy": [3.0, 1.0]})
    assert result["classes"] == ["bee", "dog", "eel"] and len(result["predictions"][0]) == 3
    assert set(result["labels"]) <= {"bee", "dog", "eel"} and len(result["labels"]) == 2
