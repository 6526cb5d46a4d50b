"""MAML with a policy-gradient inner loop on nav2d: the vectorized rollout matches the
gymnasium environment, the vmapped inner step matches a per-task loop, and a resumed run
gives the same bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.rl.maml_rl import MAMLRL, expand_params
from workers.rl.policies import gaussian_log_prob
from workers.spec import JobSpec

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


def test_inner_step_is_the_vanilla_policy_gradient_step_per_task(maml):
    goals = torch.tensor([[0.2, 0.1], [-0.3, 0.4]])
    theta = {k: v.detach() for k, v in maml.params.items()}
    data = maml.rollout(expand_params(theta, 2), goals, 3, torch.Generator().manual_seed(1))
    adapted = maml.adapt(expand_params(theta, 2), data, create_graph=False)
    for task in range(2):
        params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        mean, log_std = maml._policy(params, data.observations[task])
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
