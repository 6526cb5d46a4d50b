"""MAML++ (``mamlpp``) and Meta-Curvature (``metacurvature``) through the algorithm contract:
their spec fields are validated (422 naming the field), they train, their artifact carries the
learned inner optimizer and a served ``adapt`` steps with it, and a sweep may vary their fields.
Their meta-gradients are checked against an independent float64 reference in
test_reference_gradients_float64.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from metaserve.api.app import create_app
from metaserve.service import auth
from metaserve.service.settings import Settings
from metaserve.workers.algorithms.mamlpp import per_step_loss_weights
from metaserve.workers.engine import Trainer
from metaserve.workers.engine.final_artifact import load_meta_init

SINE = {"task_family": {"name": "sine", "support_shots": 5, "query_shots": 5},
        "model": {"name": "mlp", "hidden": [8, 8]}, "meta_batch_size": 4, "iterations": 6,
        "outer_optimizer": {"name": "adam", "lr": 0.01}, "log_every": 1, "checkpoint_every": 6,
        "evaluation": {"every": 0, "tasks": 8, "inner_steps": [1, 5]}}


# --------------------------------------------------------------------------- the spec over HTTP


@pytest.fixture
def client(engine, db_url: str, tmp_path: Path) -> Iterator[TestClient]:  # noqa: ANN001
    settings = Settings(database_url=db_url, dispatcher=False, artifact_root=tmp_path / "artifacts")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def headers(sessions) -> dict[str, str]:  # noqa: ANN001
    with sessions() as session:
        _, key = auth.create_key(session=session, name="alice")
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("algorithm,field", [
    ({"name": "mamlpp", "inner_steps": 0}, "algorithm.inner_steps"),
    ({"name": "mamlpp", "multi_step_loss_iterations": -1}, "algorithm.multi_step_loss_iterations"),
    ({"name": "mamlpp", "first_order_iterations": 1.5}, "algorithm.first_order_iterations"),
    ({"name": "mamlpp", "lslr": True}, "algorithm.lslr"),
    ({"name": "metacurvature", "inner_lr": 0}, "algorithm.inner_lr"),
    ({"name": "metacurvature", "first_order": "maybe"}, "algorithm.first_order"),
])
def test_a_bad_learned_optimizer_field_is_422_naming_it(client, headers, algorithm, field):
    response = client.post("/v1/jobs", json={"algorithm": algorithm, "task_family": {"name": "sine"}},
                           headers=headers)
    assert response.status_code == 422
    assert [d["field"] for d in response.json()["error"]["details"]] == [field]


def test_both_are_listed_with_their_fields(client, headers):
    listed = {a["name"]: a for a in client.get("/v1/algorithms", headers=headers).json()}
    assert {"mamlpp", "metacurvature"} <= set(listed)
    mamlpp = {p["name"]: p for p in listed["mamlpp"]["parameters"]}
    assert mamlpp["inner_steps"]["bounds"] == {"minimum": 1, "maximum": 100}
    assert mamlpp["multi_step_loss_iterations"]["default"] == 1000
    created = client.post("/v1/jobs", json={"algorithm": {"name": "mamlpp"}, "task_family": {"name": "sine"}},
                          headers=headers)
    assert created.status_code == 201
    assert created.json()["spec"]["algorithm"] == {
        "name": "mamlpp", "inner_lr": 0.01, "inner_steps": 5, "first_order": False,
        "multi_step_loss_iterations": 1000, "first_order_iterations": 0}


# --------------------------------------------------------------------------- MAML++'s schedules


def test_multi_step_loss_weights_follow_the_authors_schedule():
    assert per_step_loss_weights(5, 0, 100) == pytest.approx([0.2] * 5)
    # 50 of 100 iterations: non-final 0.2 − 50 · 0.002 = 0.1, the last 0.2 + 50 · 4 · 0.002 = 0.6
    assert per_step_loss_weights(5, 50, 100) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.6])
    # late in the annealing the non-final weights sit on the floor 0.03 / K
    assert per_step_loss_weights(5, 99, 100) == pytest.approx([0.006] * 4 + [1 - 0.024])
    assert per_step_loss_weights(5, 100, 100) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert per_step_loss_weights(3, 7, 0) == [0.0, 0.0, 1.0]
    for iteration in range(0, 120, 7):
        assert sum(per_step_loss_weights(4, iteration, 100)) == pytest.approx(1.0)


def test_the_trainer_runs_derivative_order_annealing_by_iteration():
    """With first_order_iterations 2, the trainer's meta-step at iterations 0 and 1 is the
    first-order one, from iteration 2 the second-order one (the trainer tells the algorithm
    the iteration; a resumed job gets the same schedule)."""
    annealed = Trainer({**SINE, "algorithm": {"name": "mamlpp", "inner_steps": 2, "inner_lr": 0.1,
                                              "first_order_iterations": 2}})
    params = annealed.init_state().params
    first = Trainer({**SINE, "algorithm": {"name": "mamlpp", "inner_steps": 2, "inner_lr": 0.1,
                                           "first_order": True}})
    second = Trainer({**SINE, "algorithm": {"name": "mamlpp", "inner_steps": 2, "inner_lr": 0.1}})

    def grads(trainer, iteration):  # noqa: ANN001, ANN202
        return trainer.shard_step(params, iteration, range(4)).grad_sum["layers.0.weight"]

    for iteration, expected in ((1, first), (2, second), (0, first)):
        torch.testing.assert_close(grads(annealed, iteration), grads(expected, iteration), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(grads(first, 2), grads(second, 2), rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------- trained and served


def manual_adapt(model, params, support_x, support_y, steps, update):  # noqa: ANN001, ANN201
    """Plain autograd SGD steps with ``update(name, grad, step)`` as the step on each parameter."""
    fast = {n: v.detach().double().requires_grad_(True) for n, v in params.items()
            if not n.startswith(("lslr.", "curvature."))}
    for step in range(steps):
        loss = ((model(fast, support_x) - support_y) ** 2).mean()
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {n: (v - update(n, g, step)).detach().requires_grad_(True) for (n, v), g in zip(fast.items(), grads)}
    return fast


def sine_task(seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(15, 1, generator=generator, dtype=torch.float64) * 10 - 5
    y = 1.7 * torch.sin(x - 0.4)
    return x[:5], y[:5], x[5:]


def test_mamlpp_trains_and_serves_with_its_learned_per_layer_per_step_rates(tmp_path):
    Trainer({**SINE, "algorithm": {"name": "mamlpp", "inner_steps": 3, "inner_lr": 0.05,
                                   "multi_step_loss_iterations": 4}}).run(tmp_path)
    served, recipe = load_meta_init(tmp_path)
    assert recipe["algorithm"] == "mamlpp" and recipe["learned_lrs"] == "per_layer_per_step"
    params = {n: v.detach().double() for n, v in served.params.items()}
    rates = {n[len("lslr."):]: v for n, v in params.items() if n.startswith("lslr.")}
    assert set(rates) == {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
                          "head.weight", "head.bias"}
    assert all(r.shape == (3,) for r in rates.values())
    assert (torch.stack(list(rates.values())) - 0.05).abs().max() > 1e-3  # learned, not the initial 0.05
    support_x, support_y, query_x = sine_task()
    model = served.functional
    for steps in (3, 5):  # past the trained 3 steps, the last step's rate
        expected_fast = manual_adapt(model, params, support_x, support_y, steps,
                                     lambda n, g, k: rates[n][min(k, 2)] * g)
        predicted = served.adapt(support_x, support_y, steps=steps)(query_x)
        torch.testing.assert_close(predicted, model(expected_fast, query_x).detach(), rtol=1e-10, atol=1e-12)
    constant = manual_adapt(model, params, support_x, support_y, 3, lambda n, g, k: 0.05 * g)
    assert not torch.allclose(served.adapt(support_x, support_y)(query_x), model(constant, query_x).detach(),
                              rtol=1e-6, atol=1e-8)


def test_metacurvature_trains_and_serves_with_its_learned_transform(tmp_path):
    Trainer({**SINE, "algorithm": {"name": "metacurvature", "inner_steps": 2, "inner_lr": 0.05}}).run(tmp_path)
    served, recipe = load_meta_init(tmp_path)
    assert recipe["algorithm"] == "metacurvature" and recipe["preconditioner"] == "kronecker"
    params = {n: v.detach().double() for n, v in served.params.items()}
    hidden = params["curvature.layers.1.weight.out"]
    assert hidden.shape == (8, 8) and params["curvature.layers.1.weight.in"].shape == (8, 8)
    assert (hidden - torch.eye(8, dtype=torch.float64)).abs().max() > 1e-3  # learned, not the identity

    def transformed(name, grad, step):  # noqa: ANN001, ANN202
        out = params[f"curvature.{name}.out"]
        return 0.05 * (out @ grad if grad.dim() == 1 else out @ grad @ params[f"curvature.{name}.in"])

    support_x, support_y, query_x = sine_task()
    model = served.functional
    expected = model(manual_adapt(model, params, support_x, support_y, 2, transformed), query_x).detach()
    torch.testing.assert_close(served.adapt(support_x, support_y)(query_x), expected, rtol=1e-10, atol=1e-12)
    plain = model(manual_adapt(model, params, support_x, support_y, 2, lambda n, g, k: 0.05 * g), query_x)
    assert not torch.allclose(expected, plain.detach(), rtol=1e-6, atol=1e-8)


def test_metacurvature_at_identity_is_maml():
    """Every factor starts as the identity, so the first meta-step is MAML's."""
    curvature = Trainer({**SINE, "algorithm": {"name": "metacurvature", "inner_steps": 2, "inner_lr": 0.1}})
    maml = Trainer({**SINE, "algorithm": {"name": "maml", "inner_steps": 2, "inner_lr": 0.1}})
    params = curvature.init_state().params
    model_params = {n: v for n, v in params.items() if not n.startswith("curvature.")}
    ours = curvature.shard_step(params, 0, range(4)).grad_sum
    theirs = maml.shard_step(model_params, 0, range(4)).grad_sum
    for name in model_params:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_a_sweep_over_their_fields_is_accepted_and_a_bad_range_is_422_naming_it(client, headers):
    base = {**SINE, "algorithm": {"name": "mamlpp", "inner_steps": 2},
            "evaluation": {"every": 2, "tasks": 8, "inner_steps": [1]}}
    sweep = {"name": "lslr", "spec": base, "search": {"name": "grid"},
             "space": {"algorithm.inner_lr": {"grid": [0.01, 0.1]},
                       "algorithm.multi_step_loss_iterations": {"grid": [0, 4]},
                       "algorithm.first_order_iterations": {"grid": [0, 3]}}}
    response = client.post("/v1/sweeps", json=sweep, headers=headers)
    assert response.status_code == 201, response.text
    curvature = {**sweep, "name": "mc", "spec": {**base, "algorithm": {"name": "metacurvature"}},
                 "search": {"name": "random", "seed": 0}, "num_samples": 2,
                 "space": {"algorithm.inner_lr": {"loguniform": [0.01, 0.3]},
                           "algorithm.first_order": {"grid": [True, False]}}}
    response = client.post("/v1/sweeps", json=curvature, headers=headers)
    assert response.status_code == 201, response.text
    bad = {**sweep, "name": "bad", "space": {"algorithm.multi_step_loss_iterations": {"grid": [-5, 4]}}}
    response = client.post("/v1/sweeps", json=bad, headers=headers)
    assert response.status_code == 422
    assert [d["field"] for d in response.json()["error"]["details"]] == [
        "space.algorithm.multi_step_loss_iterations"]
