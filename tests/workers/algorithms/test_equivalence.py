"""Equivalence tests that pin the maths of the vmapped algorithms to plain per-task autograd."""

import pytest
import torch

from metaserve.workers.algorithms import build_algorithm
from metaserve.workers.networks import build_model
from metaserve.workers.spec import ANILSpec, MAMLSpec, MetaSGDSpec, MLPSpec, PromptSpec, ReptileSpec, SineSpec
from metaserve.workers.tasks import build_task_family

TOLERANCE = dict(atol=1e-6, rtol=1e-6)


def sine_batch(tasks: int = 5):
    return build_task_family(SineSpec()).sample(seed=0, split="train", iteration=0, task_indices=range(tasks))


def setup(spec, prompt_dim: int = 0, fast_path: bool = True):
    """``fast_path``: the batched fast path (MLP; the default) or the plain vmapped step."""
    model = build_model(MLPSpec(hidden=[16, 16]), (1,), 1, prompt_dim)
    algorithm = build_algorithm(spec, model, classification=False, fast_path=fast_path)
    generator = torch.Generator().manual_seed(0)
    return model, algorithm, algorithm.init_params(generator)


def mse(prediction, target):
    return ((prediction - target) ** 2).mean()


def maml_reference(model, params, batch, *, lr: float, steps: int, create_graph: bool):
    """MAML written as a per-task Python loop with torch.autograd (the textbook form)."""
    leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
    total = {name: torch.zeros_like(value) for name, value in params.items()}
    for task in range(batch.support_x.shape[0]):
        fast = dict(leaves)
        for _ in range(steps):
            loss = mse(model(fast, batch.support_x[task]), batch.support_y[task])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
            fast = {name: value - lr * g for (name, value), g in zip(fast.items(), grads)}
        query_loss = mse(model(fast, batch.query_x[task]), batch.query_y[task])
        for name, g in zip(leaves, torch.autograd.grad(query_loss, list(leaves.values()))):
            total[name] += g
    return total


def assert_dicts_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **TOLERANCE)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "vmapped"])
def test_second_order_maml_equals_per_task_autograd_loop(steps, fast_path):
    model, algorithm, params = setup(MAMLSpec(inner_steps=steps, inner_lr=0.1), fast_path=fast_path)
    batch = sine_batch()
    grads, _ = algorithm.meta_gradient(params, *batch)
    assert_dicts_close(grads, maml_reference(model, params, batch, lr=0.1, steps=steps, create_graph=True))


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "vmapped"])
def test_fomaml_equals_maml_without_create_graph(fast_path):
    model, algorithm, params = setup(MAMLSpec(inner_steps=2, inner_lr=0.1, first_order=True), fast_path=fast_path)
    batch = sine_batch()
    grads, _ = algorithm.meta_gradient(params, *batch)
    assert_dicts_close(grads, maml_reference(model, params, batch, lr=0.1, steps=2, create_graph=False))
    second_order = maml_reference(model, params, batch, lr=0.1, steps=2, create_graph=True)
    assert not torch.allclose(grads["layers.0.weight"], second_order["layers.0.weight"], **TOLERANCE)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "vmapped"])
def test_maml_with_zero_inner_steps_equals_the_plain_loss_gradient(fast_path):
    model, algorithm, params = setup(MAMLSpec(inner_steps=0), fast_path=fast_path)
    batch = sine_batch()
    grads, metrics = algorithm.meta_gradient(params, *batch)
    leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
    losses = torch.stack([mse(model(leaves, batch.query_x[t]), batch.query_y[t]) for t in range(5)])
    expected = dict(zip(leaves, torch.autograd.grad(losses.sum(), list(leaves.values()))))
    assert_dicts_close(grads, expected)
    torch.testing.assert_close(metrics["loss_after"], losses.detach(), **TOLERANCE)
    torch.testing.assert_close(metrics["loss_before"], losses.detach(), **TOLERANCE)


@pytest.mark.parametrize("spec", [
    MAMLSpec(inner_steps=2), MAMLSpec(first_order=True), ReptileSpec(inner_steps=3), ANILSpec(inner_steps=2),
    MetaSGDSpec(inner_steps=2), PromptSpec(inner_steps=2, prompt_dim=3),
], ids=lambda spec: f"{spec.name}-{spec.inner_steps}-{getattr(spec, 'first_order', False)}")
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "vmapped"])
def test_vmapped_meta_gradient_equals_sum_of_per_task_gradients(spec, fast_path):
    _, algorithm, params = setup(spec, prompt_dim=getattr(spec, "prompt_dim", 0), fast_path=fast_path)
    batch = sine_batch()
    grads, metrics = algorithm.meta_gradient(params, *batch)
    per_task = [algorithm.meta_gradient(params, *(t[i:i + 1] for t in batch)) for i in range(5)]
    expected = {name: sum(g[name] for g, _ in per_task) for name in params}
    assert_dicts_close(grads, expected)
    for name, values in metrics.items():
        torch.testing.assert_close(values, torch.cat([m[name] for _, m in per_task]), **TOLERANCE)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "vmapped"])
def test_reptile_with_one_task_and_one_step_is_sgd_on_the_support_loss(fast_path):
    model, algorithm, params = setup(ReptileSpec(inner_steps=1, inner_lr=0.05), fast_path=fast_path)
    batch = sine_batch(1)
    pseudo_gradient, _ = algorithm.meta_gradient(params, *batch)
    leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
    loss = mse(model(leaves, batch.support_x[0]), batch.support_y[0])
    sgd_gradient = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    # θ − θ_task = α ∇L(θ): an outer SGD step with lr ε is SGD with lr ε·α
    assert_dicts_close(pseudo_gradient, {name: 0.05 * g for name, g in sgd_gradient.items()})


def test_metasgd_with_equal_learned_rates_equals_maml():
    _, maml, params = setup(MAMLSpec(inner_steps=2, inner_lr=0.03))
    _, metasgd, metasgd_params = setup(MetaSGDSpec(inner_steps=2, inner_lr=0.03))
    assert_dicts_close(metasgd.model_params(metasgd_params), params)
    batch = sine_batch()
    maml_grads, maml_metrics = maml.meta_gradient(params, *batch)
    metasgd_grads, metasgd_metrics = metasgd.meta_gradient(metasgd_params, *batch)
    assert_dicts_close(metasgd.model_params(metasgd_grads), maml_grads)
    assert set(metasgd_grads) - set(maml_grads) == {f"inner_lr.{name}" for name in params}
    torch.testing.assert_close(metasgd_metrics["loss_after"], maml_metrics["loss_after"], **TOLERANCE)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "vmapped"])
def test_anil_meta_gradient_equals_maml_restricted_to_the_head_inner_loop(fast_path):
    model, anil, params = setup(ANILSpec(inner_steps=2, inner_lr=0.1), fast_path=fast_path)
    batch = sine_batch(3)
    grads, _ = anil.meta_gradient(params, *batch)
    leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
    total = {name: torch.zeros_like(value) for name, value in params.items()}
    for task in range(3):
        fast = dict(leaves)
        for _ in range(2):
            loss = mse(model(fast, batch.support_x[task]), batch.support_y[task])
            head = ["head.weight", "head.bias"]
            head_grads = torch.autograd.grad(loss, [fast[n] for n in head], create_graph=True)
            fast = {**fast, **{n: fast[n] - 0.1 * g for n, g in zip(head, head_grads)}}
        query_loss = mse(model(fast, batch.query_x[task]), batch.query_y[task])
        for name, g in zip(leaves, torch.autograd.grad(query_loss, list(leaves.values()))):
            total[name] += g
    assert_dicts_close(grads, total)


def test_prompt_adapts_only_a_zero_initialized_prompt():
    model, prompt, params = setup(PromptSpec(inner_steps=1, inner_lr=0.5, prompt_dim=2), prompt_dim=2)
    batch = sine_batch(1)
    fast = prompt.adapt(params, batch.support_x[0], batch.support_y[0], 1)
    leaves = {name: value.detach() for name, value in params.items()}
    zero = torch.zeros(2, requires_grad=True)
    loss = mse(model(leaves, batch.support_x[0], zero), batch.support_y[0])
    (expected_grad,) = torch.autograd.grad(loss, [zero])
    torch.testing.assert_close(fast, -0.5 * expected_grad, **TOLERANCE)
    assert params["layers.0.weight"].shape == (16, 3)
