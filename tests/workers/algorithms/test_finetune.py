"""The pooled baseline (``finetune``): its training is plain training on the tasks' rows, its
evaluation and served adaptation are plain SGD from the pooled weights."""

import pydantic
import pytest
import torch

from metaserve.workers.algorithms import build_algorithm
from metaserve.workers.engine import Trainer, load_meta_init
from metaserve.workers.networks import build_model
from metaserve.workers.spec import FinetuneSpec, JobSpec, MLPSpec, SineSpec
from metaserve.workers.tasks import build_task_family

TOLERANCE = dict(atol=1e-6, rtol=1e-6)
SMALL = {
    "algorithm": {"name": "finetune", "inner_lr": 0.05, "inner_steps": 3},
    "task_family": {"name": "sine"},
    "model": {"name": "mlp", "hidden": [16, 16]},
    "iterations": 4,
    "evaluation": {"every": 0, "tasks": 8, "inner_steps": [1, 3]},
}


def mse(prediction, target):
    return ((prediction - target) ** 2).mean()


def setup(spec: FinetuneSpec):
    model = build_model(MLPSpec(hidden=[16, 16]), (1,), 1, 0)
    algorithm = build_algorithm(spec, model, classification=False)
    return model, algorithm, algorithm.init_params(torch.Generator().manual_seed(0))


def sine_batch(tasks: int = 5):
    return build_task_family(SineSpec()).sample(seed=0, split="train", iteration=0, task_indices=range(tasks))


def sgd_fine_tune(model, params, support_x, support_y, *, lr: float, steps: int):
    """``steps`` steps of torch.optim.SGD on one task's support set from ``params``."""
    leaves = [torch.nn.Parameter(value.detach().clone()) for value in params.values()]
    optimizer = torch.optim.SGD(leaves, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        mse(model(dict(zip(params, leaves)), support_x), support_y).backward()
        optimizer.step()
    return {name: leaf.detach() for name, leaf in zip(params, leaves)}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_one_task_per_meta_batch_trains_exactly_as_plain_training_on_its_rows(optimizer):
    """Meta-batch 1: each iteration is one torch.optim step on the sampled task's support and
    query rows together."""
    trainer = Trainer({**SMALL, "meta_batch_size": 1, "outer_optimizer": {"name": optimizer, "lr": 0.01}})
    state = trainer.init_state()
    leaves = {name: torch.nn.Parameter(value.clone()) for name, value in state.params.items()}
    torch_optimizer = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(list(leaves.values()), lr=0.01)
    for iteration in range(6):
        state, metrics = trainer.step(state)
        batch = trainer.family.sample(seed=0, split="train", iteration=iteration, task_indices=[0])
        torch_optimizer.zero_grad()
        loss = mse(trainer.model(leaves, torch.cat([batch.support_x[0], batch.query_x[0]])),
                   torch.cat([batch.support_y[0], batch.query_y[0]]))
        loss.backward()
        torch_optimizer.step()
        assert metrics["train/loss_pooled"] == pytest.approx(loss.item(), rel=1e-6)
    for name, leaf in leaves.items():
        torch.testing.assert_close(state.params[name], leaf.detach(), **TOLERANCE)


def test_gradient_of_a_meta_batch_is_the_sum_of_each_tasks_pooled_loss_gradient():
    model, algorithm, params = setup(FinetuneSpec(inner_steps=2))
    batch = sine_batch()
    grads, metrics = algorithm.meta_gradient(params, *batch)
    leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
    losses = torch.stack([
        mse(model(leaves, torch.cat([batch.support_x[t], batch.query_x[t]])),
            torch.cat([batch.support_y[t], batch.query_y[t]])) for t in range(5)])
    expected = dict(zip(leaves, torch.autograd.grad(losses.sum(), list(leaves.values()))))
    assert grads.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], **TOLERANCE)
    query_losses = torch.stack([mse(model(params, batch.query_x[t]), batch.query_y[t]) for t in range(5)])
    assert set(metrics) == {"loss_pooled", "loss_before"}
    torch.testing.assert_close(metrics["loss_pooled"], losses.detach(), **TOLERANCE)
    torch.testing.assert_close(metrics["loss_before"], query_losses, **TOLERANCE)


def test_training_gradient_does_not_depend_on_the_fine_tuning_steps():
    """No inner loop in training: ``inner_steps`` only says how a task is adapted."""
    _, one_step, params = setup(FinetuneSpec(inner_steps=1))
    _, ten_steps, _ = setup(FinetuneSpec(inner_steps=10))
    batch = sine_batch()
    first, _ = one_step.meta_gradient(params, *batch)
    second, _ = ten_steps.meta_gradient(params, *batch)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_evaluation_at_zero_steps_is_the_pooled_models_query_loss():
    model, algorithm, params = setup(FinetuneSpec())
    batch = sine_batch()
    losses, accuracies = algorithm.evaluation_curves(params, *batch, steps=(0,))
    expected = torch.stack([mse(model(params, batch.query_x[t]), batch.query_y[t]) for t in range(5)])
    torch.testing.assert_close(losses[:, 0], expected, **TOLERANCE)
    torch.testing.assert_close(accuracies[:, 0], expected, **TOLERANCE)  # regression: the loss again


def test_evaluation_after_k_steps_is_k_sgd_steps_on_the_support_set_from_the_pooled_weights():
    model, algorithm, params = setup(FinetuneSpec(inner_lr=0.05))
    batch = sine_batch()
    losses, _ = algorithm.evaluation_curves(params, *batch, steps=(0, 1, 4))
    for t in range(5):
        for column, steps in enumerate((0, 1, 4)):
            tuned = sgd_fine_tune(model, params, batch.support_x[t], batch.support_y[t], lr=0.05, steps=steps)
            torch.testing.assert_close(losses[t, column], mse(model(tuned, batch.query_x[t]), batch.query_y[t]),
                                       **TOLERANCE)
    assert not torch.allclose(losses[:, 2], losses[:, 0])  # the steps did move the weights


def test_artifact_adapts_with_the_recipes_fine_tuning_steps(tmp_path):
    trainer = Trainer(SMALL)
    state = trainer.run(tmp_path)
    model, recipe = load_meta_init(tmp_path)
    assert recipe == {"algorithm": "finetune", "inner_lr": 0.05, "inner_steps": 3, "adapts": "all",
                      "pretraining": "pooled"}
    batch = trainer.family.sample(seed=7, split="test", iteration=0, task_indices=[0])
    support_x, support_y, query_x = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    expected = trainer.model(sgd_fine_tune(trainer.model, {k: v.double() for k, v in state.params.items()},
                                           support_x.double(), support_y.double(), lr=0.05, steps=3),
                             query_x.double())
    torch.testing.assert_close(model.adapt(support_x, support_y)(query_x), expected.float(), **TOLERANCE)
    torch.testing.assert_close(model.adapt(support_x, support_y, steps=0)(query_x), model(query_x))


def test_spec_defaults_and_rl_families_refused():
    spec = JobSpec.model_validate({"algorithm": {"name": "finetune"}, "task_family": {"name": "sine"}})
    assert (spec.algorithm.inner_lr, spec.algorithm.inner_steps) == (0.01, 10)
    with pytest.raises(pydantic.ValidationError) as error:
        JobSpec.model_validate({"algorithm": {"name": "finetune"}, "task_family": {"name": "bandit"}})
    assert error.value.errors()[0]["loc"] == ("task_family",)
    assert "not 'finetune'" in error.value.errors()[0]["msg"]
