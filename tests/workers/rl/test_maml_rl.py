"""MAML with a policy-gradient inner loop on nav2d: the vectorized rollout matches the
gymnasium environment, the vmapped inner step matches a per-task loop, a resumed run gives
the same bits; the TRPO outer step: conjugate gradient, the KL Hessian-vector product
through the inner step, the line search's KL bound, and spec validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.func import vmap

from metaserve.workers.rl.maml_rl import MAMLRL
from metaserve.workers.rl.policies import expand_params
from metaserve.workers.rl.trpo import conjugate_gradient, flatten, unflatten
from metaserve.workers.rl.policies import gaussian_log_prob
from metaserve.workers.spec import JobSpec

SMALL = {"algorithm": {"name": "maml", "inner_lr": 0.1,
                       "policy_gradient": {"episodes_per_task": 3, "hidden": [8], "outer_epochs": 2}},
         "task_family": {"name": "nav2d", "horizon": 12}, "meta_batch_size": 2,
         "evaluation": {"tasks": 3, "inner_steps": [1, 2]}}


@pytest.fixture
def maml() -> MAMLRL:
    torch.set_num_threads(1)
    return MAMLRL(JobSpec.model_validate(SMALL))


def test_vectorized_rollout_replays_exactly_in_the_gymnasium_env(maml):
    goals = torch.tensor([[0.05, -0.02], [0.4, 0.3]])
    params = expand_params({k: v.detach() for k, v in maml.params.items()}, 2)
    data = maml.rollout(params, goals, 3, torch.Generator().manual_seed(0))
    env = maml.family.make_env()
    for task in range(2):
        for episode in range(3):
            env.set_task({"goal": goals[task].double().numpy()})
            env.reset(seed=0)
            rewards = []
            for step in range(12):
                if not data.mask[task, episode, step]:
                    break
                _, reward, terminated, truncated, _ = env.step(
                    data.actions[task, episode, step].double().numpy())
                rewards.append(reward)
                if terminated or truncated:
                    break
            assert np.allclose(rewards, data.rewards[task, episode, :len(rewards)].numpy(), atol=1e-5)
            assert int(data.mask[task, episode].sum()) == len(rewards)


def test_halfcheetah_rollout_replays_in_mujoco_and_a_meta_iteration_runs():
    spec = {**SMALL, "task_family": {"name": "halfcheetah_vel", "horizon": 6}}
    maml = MAMLRL(JobSpec.model_validate(spec))
    goals = torch.tensor([[0.5], [1.8]])
    params = expand_params({k: v.detach() for k, v in maml.params.items()}, 2)
    data = maml.rollout(params, goals, 3, torch.Generator().manual_seed(0))
    again = maml.rollout(params, goals, 3, torch.Generator().manual_seed(0))
    assert data.observations.shape == (2, 3, 6, 17) and data.actions.shape == (2, 3, 6, 6)
    assert torch.equal(data.rewards, again.rewards) and bool(data.mask.all())
    seeds = torch.randint(2**31 - 1, (6,), generator=torch.Generator().manual_seed(0)).tolist()
    env = maml.family.make_env()
    for index, seed in enumerate(seeds):
        task, episode = divmod(index, 3)
        env.set_task({"goal": goals[task].double().numpy()})
        observation, _ = env.reset(seed=seed)
        assert np.allclose(observation, data.observations[task, episode, 0].numpy(), atol=1e-6)
        rewards = [env.step(np.clip(data.actions[task, episode, step].double().numpy(), -1, 1))[1]
                   for step in range(6)]
        assert np.allclose(rewards, data.rewards[task, episode].numpy(), atol=1e-4)
    metrics = maml.train_iteration()
    assert maml.env_steps == 2 * 3 * 6 * 2  # pre- and post-update rollouts
    assert maml.meta_policy()[1]["architecture"]["observation_size"] == 17
    maml.close()


def test_inner_step_is_the_vanilla_policy_gradient_step_per_task(maml):
    goals = torch.tensor([[0.2, 0.1], [-0.3, 0.4]])
    theta = {k: v.detach() for k, v in maml.params.items()}
    data = maml.rollout(expand_params(theta, 2), goals, 3, torch.Generator().manual_seed(1))
    adapted = maml.adapt(expand_params(theta, 2), data, create_graph=False)
    for task in range(2):
        params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        mean, log_std = maml.policy_outputs(params, data.observations[task])
        log_prob = gaussian_log_prob(mean, log_std, data.actions[task])
        mask = data.mask[task]
        vpg_loss = -(log_prob * data.advantages[task] * mask).sum() / mask.sum()
        gradients = torch.autograd.grad(vpg_loss, list(params.values()))
        for (name, value), gradient in zip(theta.items(), gradients):
            assert torch.allclose(adapted[name][task], value - 0.1 * gradient, atol=1e-6), name


def test_advantages_are_normalized_per_task_over_the_steps_taken(maml):
    goals = torch.tensor([[0.2, 0.1], [-0.3, 0.4]])
    data = maml.rollout(expand_params({k: v.detach() for k, v in maml.params.items()}, 2),
                        goals, 3, torch.Generator().manual_seed(2))
    for task in range(2):
        valid = data.advantages[task][data.mask[task] > 0]
        assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert valid.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert torch.all(data.advantages[data.mask == 0] == 0)


def test_a_resumed_run_gives_the_same_parameters_as_an_uninterrupted_one():
    torch.set_num_threads(1)
    spec = JobSpec.model_validate(SMALL)
    straight = MAMLRL(spec)
    for _ in range(3):
        straight.train_iteration()
    first = MAMLRL(spec)
    for _ in range(2):
        first.train_iteration()
    tensors, document = first.state()
    resumed = MAMLRL(spec)
    resumed.load_state(tensors, document)
    resumed.train_iteration()
    assert (resumed.iteration, resumed.env_steps) == (straight.iteration, straight.env_steps)
    for name, value in straight.params.items():
        assert torch.equal(value, resumed.params[name]), name


def test_evaluation_reports_returns_before_and_after_each_step_count(maml):
    results = maml.evaluate("val")
    assert sorted(results) == sorted(f"val/return_step{k}{suffix}" for k in (0, 1, 2)
                                     for suffix in ("", "_ci95"))
    assert all(-12 * 1.5 <= results[f"val/return_step{k}"] <= 0 for k in (0, 1, 2))


# ---------------------------------------------------------------------- TRPO outer step

TRPO = {**SMALL, "algorithm": {**SMALL["algorithm"], "policy_gradient": {
    **SMALL["algorithm"]["policy_gradient"], "outer": "trpo", "normalize_actions": True,
    "hidden": [4], "max_kl": 0.01}}}


def _trpo(overrides: dict | None = None) -> MAMLRL:
    torch.set_num_threads(1)
    spec = {**TRPO, "task_family": {"name": "nav2d", "horizon": 6}}
    spec["algorithm"] = {**spec["algorithm"], **(overrides or {})}
    return MAMLRL(JobSpec.model_validate(spec))


def _batches(maml: MAMLRL, seed: int = 3, steps: int = 1):
    goals = torch.tensor([[0.2, 0.1], [-0.3, 0.4]])
    generator = torch.Generator().manual_seed(seed)
    theta = {k: v.detach().clone() for k, v in maml.params.items()}
    batches, adapted = [], expand_params(theta, 2)
    for _ in range(steps):
        batches.append(maml.rollout(adapted, goals, 3, generator))
        adapted = maml.adapt(adapted, batches[-1], create_graph=False)
    return theta, batches, maml.rollout(adapted, goals, 3, generator)


def test_conjugate_gradient_solves_a_symmetric_positive_definite_system():
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    matrix = factor @ factor.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=generator, dtype=torch.float64)
    x = conjugate_gradient(lambda v: matrix @ v, b, iterations=20)
    assert torch.allclose(x, torch.linalg.solve(matrix, b), atol=1e-6)
    assert (matrix @ x - b).abs().max().item() < 1e-6


@pytest.mark.parametrize("steps", [1, 2])
def test_kl_hessian_vector_product_matches_the_hessian_through_the_inner_steps(steps):
    maml = _trpo()
    theta, batches, post = _batches(maml, steps=steps)
    with torch.no_grad():
        old = vmap(maml.policy_outputs)(maml.adapt_all(theta, batches, create_graph=False),
                                 post.observations)

    def mean_kl(vector):
        return maml.mean_kl(old, maml.adapt_all(unflatten(vector, theta), batches), post)

    hessian = torch.autograd.functional.hessian(mean_kl, flatten(theta))
    hvp = maml.kl_hvp(theta, batches, post)
    vector = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(4))
    expected = hessian @ vector
    assert torch.allclose(hvp(vector), expected, atol=1e-5 * expected.abs().max().item() + 1e-7,
                          rtol=1e-3)


def test_the_accepted_trpo_step_improves_the_surrogate_within_the_kl_bound():
    maml = _trpo()
    theta, batches, post = _batches(maml)
    before = flatten(theta)
    metrics = maml._trpo_step(batches, post)
    after = {k: v.detach() for k, v in maml.params.items()}
    assert not torch.equal(flatten(after), before)
    with torch.no_grad():
        old = vmap(maml.policy_outputs)(maml.adapt_all(theta, batches, create_graph=False),
                                 post.observations)
        adapted = maml.adapt_all(after, batches, create_graph=False)
        kl = maml.mean_kl(old, adapted, post).item()
        improved = maml.surrogate(adapted, post).item()
        start = maml.surrogate(maml.adapt_all(theta, batches, create_graph=False), post).item()
    assert 0 < kl <= 0.01
    assert improved > start
    assert metrics["train/kl"] == pytest.approx(kl, rel=1e-4)


def test_trpo_takes_no_step_when_no_candidate_satisfies_the_kl_bound(monkeypatch):
    maml = _trpo({"policy_gradient": {**TRPO["algorithm"]["policy_gradient"],
                                      "line_search_steps": 3}})
    _, batches, post = _batches(maml)
    before = flatten({k: v.detach().clone() for k, v in maml.params.items()})
    mean_kl = maml.mean_kl  # shifted by a constant: same Hessian, every candidate over the bound
    monkeypatch.setattr(maml, "mean_kl", lambda *args: mean_kl(*args) + 1.0)
    metrics = maml._trpo_step(batches, post)
    assert torch.equal(flatten({k: v.detach() for k, v in maml.params.items()}), before)
    assert metrics["train/line_search_steps"] == 3 and metrics["train/kl"] == 0.0
    assert metrics["train/surrogate_after"] == metrics["train/surrogate_before"]


def test_normalized_actions_are_scaled_to_the_max_action_in_the_environment():
    maml = _trpo()
    goals = torch.tensor([[0.3, -0.2]])
    params = expand_params({k: v.detach() for k, v in maml.params.items()}, 1)
    data = maml.rollout(params, goals, 2, torch.Generator().manual_seed(5))
    env = maml.family.make_env()
    env.set_task({"goal": goals[0].double().numpy()})
    env.reset(seed=0)
    for step in range(int(data.mask[0, 0].sum())):
        _, reward, *_ = env.step((0.1 * data.actions[0, 0, step]).double().numpy())
        assert reward == pytest.approx(data.rewards[0, 0, step].item(), abs=1e-5)


@pytest.mark.parametrize("outer", ["ppo", "trpo"])
def test_a_resumed_trpo_or_ppo_run_gives_the_same_parameters(outer):
    torch.set_num_threads(1)
    spec = JobSpec.model_validate({**TRPO, "algorithm": {**TRPO["algorithm"], "policy_gradient": {
        **TRPO["algorithm"]["policy_gradient"], "outer": outer}}})
    straight = MAMLRL(spec)
    for _ in range(2):
        straight.train_iteration()
    first = MAMLRL(spec)
    first.train_iteration()
    resumed = MAMLRL(spec)
    resumed.load_state(*first.state())
    resumed.train_iteration()
    for name, value in straight.params.items():
        assert torch.equal(value, resumed.params[name]), name


@pytest.mark.parametrize(("field", "value"), [("outer", "sgd"), ("max_kl", 0.0), ("cg_iters", 0),
                                              ("backtrack_ratio", 1.0), ("cg_damping", -1.0)])
def test_spec_validation_names_the_bad_trpo_field(field, value):
    spec = {**TRPO, "algorithm": {**TRPO["algorithm"], "policy_gradient": {
        **TRPO["algorithm"]["policy_gradient"], field: value}}}
    with pytest.raises(ValidationError) as error:
        JobSpec.model_validate(spec)
    locations = [e["loc"] for e in error.value.errors()]
    assert any(loc[-1] == field and "policy_gradient" in loc for loc in locations), locations


def test_later_inner_lr_applies_to_the_second_and_later_steps_only():
    maml = _trpo({"policy_gradient": {**TRPO["algorithm"]["policy_gradient"],
                                      "later_inner_lr": 0.025}})
    theta, (pre,), _ = _batches(maml)
    first = maml.adapt(expand_params(theta, 2), pre, create_graph=False, step=0)
    later = maml.adapt(expand_params(theta, 2), pre, create_graph=False, step=2)
    for name, value in theta.items():  # same gradient, step sizes 0.1 and 0.025
        assert torch.allclose(value - later[name], 0.25 * (value - first[name]), atol=1e-6), name
