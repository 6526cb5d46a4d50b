"""PEARL's pieces: the product-of-Gaussians posterior, the tanh-Gaussian log-likelihood, the
batched nav2d simulation against the gymnasium env, and a state round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.rl.pearl import PEARL, PEARLAgent, simulate_nav2d
from workers.rl.tasks import Nav2DEnv
from workers.spec import JobSpec, Nav2DSpec

SMALL = {"algorithm": {"name": "pearl", "hidden": 16, "train_tasks": 4, "tasks_per_iteration": 2,
                       "gradient_steps": 2, "batch_size": 8, "context_size": 4, "evaluation_tasks": 3},
         "task_family": {"name": "nav2d", "horizon": 15}, "meta_batch_size": 2}


def test_posterior_is_the_product_of_the_per_transition_gaussians():
    torch.manual_seed(0)
    agent = PEARLAgent(latent_dim=3, hidden=8, max_action=0.1)
    context = torch.randn(2, 4, 5)
    mean, variance = agent.posterior(context)
    factor_mean, raw = agent.encoder(context).chunk(2, dim=-1)
    factor_variance = torch.nn.functional.softplus(raw)
    precision = (1 / factor_variance).sum(1)
    assert torch.allclose(variance, 1 / precision)
    assert torch.allclose(mean, (factor_mean / factor_variance).sum(1) / precision)


def test_tanh_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(1)
    agent = PEARLAgent(latent_dim=2, hidden=8, max_action=1.0)
    observation, z = torch.randn(5, 2), torch.randn(5, 2)
    generator = torch.Generator().manual_seed(3)
    action, log_prob = agent.act(observation, z, generator=generator)
    mean, log_std = agent.policy(torch.cat([observation, z], -1)).chunk(2, dim=-1)
    distribution = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()])
    expected = distribution.log_prob(action.clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1)
    assert torch.allclose(log_prob, expected, atol=1e-3)


def test_batched_simulation_replays_exactly_in_the_gymnasium_env():
    torch.manual_seed(2)
    agent = PEARLAgent(latent_dim=2, hidden=8, max_action=0.1)
    nav = Nav2DSpec(horizon=15)
    goals = torch.tensor([[0.02, 0.01], [0.3, -0.4]])
    episodes = simulate_nav2d(agent, nav, goals, torch.zeros(2, 2), torch.Generator().manual_seed(0))
    env = Nav2DEnv(nav.horizon, nav.max_action)
    for task in range(2):
        env.set_task({"goal": goals[task].double().numpy()})
        env.reset(seed=0)
        steps = int(episodes.mask[task].sum())
        rewards = [env.step(episodes.actions[task, t].double().numpy())[1] for t in range(steps)]
        assert np.allclose(rewards, episodes.rewards[task, :steps].numpy(), atol=1e-5)
    assert episodes.context().shape == (2, 15, 5)


@pytest.mark.slow
def test_state_round_trip_restores_networks_optimizers_and_replay(ray_session):
    torch.set_num_threads(1)
    spec = JobSpec.model_validate(SMALL)
    pearl = PEARL(spec)
    try:
        metrics = pearl.train_iteration()
        assert sorted(metrics) == ["train/critic_loss", "train/env_steps", "train/kl", "train/policy_loss"]
        tensors, document = pearl.state()
        restored = PEARL(spec)
        restored.load_state(tensors, document)
        again, _ = restored.state()
        assert sorted(again) == sorted(tensors)
        assert all(torch.equal(again[k], tensors[k]) for k in tensors)
        assert (restored.iteration, restored.env_steps) == (1, pearl.env_steps)
        results = restored.evaluate("val")
        assert sorted(results) == ["val/adapted_return", "val/return_episode0", "val/return_episode1"]
        assert all(-15 * 1.5 <= v <= 0 for v in results.values())
    finally:
        pearl.close()


@pytest.mark.parametrize("family", ["bandit", "tabular_mdp"])
def test_pearl_refuses_families_without_continuous_actions(family):
    with pytest.raises(ValueError):
        JobSpec.model_validate({"algorithm": {"name": "pearl"}, "task_family": {"name": family}})
