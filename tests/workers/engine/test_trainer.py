import json
import math

import pytest
import torch

from metaserve.workers.engine import CheckpointError, ShardResult, Trainer, TrainState, load_meta_init
from metaserve.workers.engine.checkpoints import CHECKPOINT_JSON

SMALL = {
    "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
    "task_family": {"name": "sine"},
    "model": {"name": "mlp", "hidden": [16, 16]},
    "meta_batch_size": 6,
    "iterations": 8,
    "evaluation": {"every": 4, "tasks": 20, "inner_steps": [1, 3]},
    "checkpoint_every": 3,
    "log_every": 2,
}


def spec(**changes):
    document = json.loads(json.dumps(SMALL))
    for key, value in changes.items():
        document[key] = value
    return document


def assert_identical(first: dict, second: dict):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def train(trainer: Trainer, iterations: int, state: TrainState | None = None) -> TrainState:
    state = state or trainer.init_state()
    for _ in range(iterations):
        state, _ = trainer.step(state)
    return state


@pytest.mark.parametrize("algorithm", ["maml", "reptile", "anil", "metasgd", "prompt"])
def test_same_spec_and_seed_give_bit_identical_params(algorithm):
    document = spec(algorithm={"name": algorithm})
    first = train(Trainer(document), 3)
    second = train(Trainer(document), 3)
    assert first.iteration == second.iteration == 3
    assert_identical(first.params, second.params)
    assert_identical(first.opt_state, second.opt_state)
    assert not torch.equal(first.params["head.weight"], Trainer(document).init_state().params["head.weight"])


def test_different_seeds_give_different_params():
    assert not torch.equal(train(Trainer(spec(seed=1)), 1).params["head.weight"],
                           train(Trainer(spec(seed=2)), 1).params["head.weight"])


def test_apply_of_shards_in_a_fixed_layout_is_deterministic_and_close_to_one_shard():
    trainer = Trainer(spec())
    state = trainer.init_state()

    def sharded():
        shards = [trainer.shard_step(state.params, 0, [0, 1, 2]), trainer.shard_step(state.params, 0, [3, 4, 5])]
        return trainer.apply(state, shards)

    first, second = sharded(), sharded()
    assert_identical(first.params, second.params)
    whole, _ = trainer.step(state)
    for name in whole.params:
        torch.testing.assert_close(first.params[name], whole.params[name], atol=1e-6, rtol=1e-5)


def test_shard_step_returns_sum_of_task_gradients_and_per_task_metrics_on_cpu():
    trainer = Trainer(spec(resources={"task_chunk": 2}))
    params = trainer.init_state().params
    result = trainer.shard_step(params, 5, [0, 1, 2, 3, 4])
    singles = [trainer.shard_step(params, 5, [task]) for task in range(5)]
    assert isinstance(result, ShardResult) and result.num_tasks == 5
    for name in params:
        torch.testing.assert_close(result.grad_sum[name], sum(s.grad_sum[name] for s in singles),
                                   atol=1e-6, rtol=1e-5)
        assert result.grad_sum[name].device.type == "cpu"
    assert set(result.metrics) == {"loss_before", "loss_after"}
    assert result.metrics["loss_after"].shape == (5,)
    torch.testing.assert_close(result.metrics["loss_after"], torch.cat([s.metrics["loss_after"] for s in singles]))


def test_apply_does_not_mutate_the_state():
    trainer = Trainer(spec())
    state = trainer.init_state()
    before = {name: value.clone() for name, value in {**state.params, **state.opt_state}.items()}
    new_state = trainer.apply(state, [trainer.shard_step(state.params, 0, range(6))])
    assert new_state.iteration == 1 and state.iteration == 0
    assert_identical({**state.params, **state.opt_state}, before)


def test_sgd_outer_step_is_params_minus_lr_times_mean_gradient():
    trainer = Trainer(spec(outer_optimizer={"name": "sgd", "lr": 0.5}))
    state = trainer.init_state()
    result = trainer.shard_step(state.params, 0, range(6))
    new_state = trainer.apply(state, [result])
    assert new_state.opt_state == {}
    for name, value in state.params.items():
        torch.testing.assert_close(new_state.params[name], value - 0.5 * result.grad_sum[name] / 6)


def test_adam_outer_step_matches_torch_optim_adam():
    trainer = Trainer(spec(outer_optimizer={"name": "adam", "lr": 0.01}))
    state = trainer.init_state()
    parameters = {name: torch.nn.Parameter(value.clone()) for name, value in state.params.items()}
    reference = torch.optim.Adam(parameters.values(), lr=0.01)
    for iteration in range(3):
        result = trainer.shard_step(state.params, iteration, range(6))
        state = trainer.apply(state, [result])
        for name, parameter in parameters.items():
            parameter.grad = result.grad_sum[name] / 6
        reference.step()
    for name, parameter in parameters.items():
        torch.testing.assert_close(state.params[name], parameter.detach(), atol=1e-6, rtol=1e-5)


def test_resuming_from_a_checkpoint_gives_bit_identical_final_params(tmp_path):
    document = spec(algorithm={"name": "metasgd"})
    uninterrupted = Trainer(document).run(tmp_path / "whole")
    interrupted_trainer = Trainer(document)
    partial = train(interrupted_trainer, 5)
    interrupted_trainer.save_checkpoint(partial, tmp_path / "resumed" / "checkpoint")
    resumed = Trainer(document).run(tmp_path / "resumed")
    assert resumed.iteration == uninterrupted.iteration == 8
    assert_identical(resumed.params, uninterrupted.params)
    assert_identical(resumed.opt_state, uninterrupted.opt_state)


def test_checkpoint_round_trips_params_optimizer_state_and_iteration(tmp_path):
    trainer = Trainer(spec(algorithm={"name": "metasgd"}))
    state = train(trainer, 2)
    paths = trainer.save_checkpoint(state, tmp_path)
    assert sorted(p.name for p in paths) == ["checkpoint.json", "checkpoint.safetensors"]
    loaded = trainer.load_checkpoint(tmp_path)
    assert loaded.iteration == 2
    assert_identical(loaded.params, state.params)
    assert_identical(loaded.opt_state, state.opt_state)
    assert any(name.startswith("inner_lr.") for name in loaded.params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "checkpoint.safetensors"]


def test_missing_checkpoint_loads_as_none_and_inconsistent_one_raises(tmp_path):
    trainer = Trainer(spec())
    assert trainer.load_checkpoint(tmp_path) is None
    trainer.save_checkpoint(train(trainer, 1), tmp_path)
    document = json.loads((tmp_path / CHECKPOINT_JSON).read_text())
    document["iteration"] = 7
    (tmp_path / CHECKPOINT_JSON).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="disagree on the iteration"):
        trainer.load_checkpoint(tmp_path)


def test_evaluate_reports_mean_and_ci_before_and_after_each_step_count():
    trainer = Trainer(spec())
    metrics = trainer.evaluate(trainer.init_state().params, split="test", tasks=30)
    assert sorted(metrics) == sorted([
        "test/loss_step0", "test/loss_step0_ci95", "test/loss_step1", "test/loss_step1_ci95",
        "test/loss_step3", "test/loss_step3_ci95", "test/tasks"])
    assert metrics["test/tasks"] == 30
    assert metrics["test/loss_step3"] < metrics["test/loss_step0"]
    assert all(math.isfinite(v) and v >= 0 for v in metrics.values())
    # the held-out tasks are fixed: evaluating twice gives the same numbers
    assert metrics == trainer.evaluate(trainer.init_state().params, split="test", tasks=30)


def test_run_reports_logs_evaluations_and_writes_meta_init(tmp_path):
    reports = []
    state = Trainer(spec()).run(tmp_path, reporter=lambda step, metrics: reports.append((step, sorted(metrics))))
    assert state.iteration == 8
    steps = [step for step, _ in reports]
    assert steps == [2, 4, 4, 6, 8, 8]
    assert reports[0][1] == ["train/loss_after", "train/loss_before", "train/tasks_per_second"]
    assert "val/loss_step1" in reports[2][1] and "test/loss_step1_ci95" in reports[-1][1]
    document = json.loads((tmp_path / "meta_init.json").read_text())
    assert document["recipe"] == {"algorithm": "maml", "inner_lr": 0.01, "inner_steps": 1, "adapts": "all",
                                  "first_order": False}
    assert document["architecture"] == {"name": "mlp", "hidden": [16, 16], "activation": "relu",
                                        "input_shape": [1], "output_dim": 1, "prompt_dim": 0}
    assert document["iterations"] == 8 and document["task_family"]["name"] == "sine"
    assert set(document["versions"]) == {"metaserve", "torch"}
    assert "test/loss_step1" in document["evaluation"] and document["spec"]["meta_batch_size"] == 6


def test_metasgd_artifact_holds_learned_rates_and_recipe_says_so(tmp_path):
    trainer = Trainer(spec(algorithm={"name": "metasgd"}, iterations=2))
    state = trainer.run(tmp_path)
    model, recipe = load_meta_init(tmp_path)
    assert recipe["learned_lrs"] is True and "inner_lr" not in recipe
    assert set(model.params) == set(state.params)
    assert_identical({n: p.detach() for n, p in model.params.items()}, state.params)


@pytest.mark.parametrize("algorithm", ["maml", "prompt", "anil"])
def test_loaded_meta_init_predicts_and_adapts_like_the_trainer(tmp_path, algorithm):
    trainer = Trainer(spec(algorithm={"name": algorithm}, iterations=2))
    state = trainer.run(tmp_path)
    model, recipe = load_meta_init(tmp_path)
    assert recipe["algorithm"] == algorithm
    batch = trainer.family.sample(seed=9, split="test", iteration=0, task_indices=[0])
    fast = trainer.algorithm.adapt(state.params, batch.support_x[0], batch.support_y[0], 3)
    expected = trainer.algorithm.predict(state.params, fast, batch.query_x[0])
    adapted = model.adapt(batch.support_x[0], batch.support_y[0], steps=3)
    torch.testing.assert_close(adapted(batch.query_x[0]), expected)
    assert model(batch.query_x[0]).shape == (10, 1)
