"""PEARL's pieces: the product-of-Gaussians posterior, the tanh-Gaussian log-likelihood, the
batched nav2d simulation against the gymnasium env, the encoder's context (the latest prior
episode, as at evaluation), deterministic evaluation, the learned temperature, and a state
round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaserve.workers.rl.pearl import PEARL
from metaserve.workers.rl.pearl_agent import PEARLAgent, play_episodes, probe_r2
from metaserve.workers.rl.nav2d import Nav2DEnv
from metaserve.workers.spec import JobSpec, Nav2DSpec

SMALL = {"algorithm": {"name": "pearl", "hidden": 16, "train_tasks": 4, "tasks_per_iteration": 2,
                       "gradient_steps": 2, "batch_size": 8, "context_size": 4, "evaluation_tasks": 3},
         "task_family": {"name": "nav2d", "horizon": 15}, "meta_batch_size": 2}


def test_posterior_is_the_product_of_the_per_transition_gaussians():
    torch.manual_seed(0)
    agent = PEARLAgent(latent_dim=3, hidden=8, max_action=0.1)
    context = torch.randn(2, 4, 7)
    mean, variance = agent.posterior(context)
    factor_mean, raw = agent.encoder(context).chunk(2, dim=-1)
    factor_variance = torch.nn.functional.softplus(raw)
    precision = (1 / factor_variance).sum(1)
    assert torch.allclose(variance, 1 / precision)
    assert torch.allclose(mean, (factor_mean / factor_variance).sum(1) / precision)


def test_posterior_density_is_the_normalized_product_of_the_factor_densities():
    torch.manual_seed(4)
    agent = PEARLAgent(latent_dim=2, hidden=8, max_action=0.1)
    context = torch.randn(1, 6, 7)
    mean, variance = agent.posterior(context)
    factor_mean, raw = agent.encoder(context[0]).chunk(2, dim=-1)
    factors = torch.distributions.Normal(factor_mean, torch.nn.functional.softplus(raw).sqrt())
    posterior = torch.distributions.Normal(mean[0], variance[0].sqrt())
    z = torch.randn(50, 1, 2) * 3
    # log Π_i N(z; μ_i, σ_i²) − log N(z; μ, σ²) must not depend on z (the product's normalizer)
    gap = (factors.log_prob(z).sum(1) - posterior.log_prob(z[:, 0])).double()
    assert torch.allclose(gap, gap[0].expand_as(gap), atol=1e-3)


def test_tanh_gaussian_log_prob_matches_a_numerical_density():
    """log π(a) against the change of variables done numerically: the Gaussian density of
    u = atanh(a / max) over a finite-difference |da/du|, for a scaled to ±max_action."""
    torch.manual_seed(5)
    agent = PEARLAgent(latent_dim=2, hidden=8, max_action=0.1)
    observation, z = torch.randn(64, 2), torch.randn(64, 2)
    action, log_prob = agent.act(observation, z, generator=torch.Generator().manual_seed(6))
    mean, log_std = agent.policy(torch.cat([observation, z], -1)).chunk(2, dim=-1)
    u = torch.atanh((action / 0.1).double().clamp(-1 + 1e-12, 1 - 1e-12))
    h = 1e-6
    slope = (torch.tanh(u + h) - torch.tanh(u - h)) / (2 * h)  # d(a/max)/du
    gaussian = torch.distributions.Normal(mean.double(), log_std.double().exp()).log_prob(u)
    expected = (gaussian - slope.log()).sum(-1)
    assert torch.allclose(log_prob.double(), expected, atol=1e-3)


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
    episodes = play_episodes(agent, nav, goals, torch.zeros(2, 2), torch.Generator().manual_seed(0))
    env = Nav2DEnv(nav.horizon, nav.max_action)
    for task in range(2):
        env.set_task({"goal": goals[task].double().numpy()})
        env.reset(seed=0)
        steps = int(episodes.mask[task].sum())
        rewards = [env.step(episodes.actions[task, t].double().numpy())[1] for t in range(steps)]
        assert np.allclose(rewards, episodes.rewards[task, :steps].numpy(), atol=1e-5)
    assert episodes.transitions().shape == (2, 15, 7)


def test_deterministic_simulation_takes_the_mean_action():
    torch.manual_seed(7)
    agent = PEARLAgent(latent_dim=2, hidden=8, max_action=0.1)
    nav = Nav2DSpec(horizon=5)
    goals, z = torch.tensor([[0.3, 0.2]]), torch.randn(1, 2)
    episodes = [play_episodes(agent, nav, goals, z, torch.Generator().manual_seed(seed),
                               deterministic=True) for seed in (0, 1)]
    assert torch.equal(episodes[0].actions, episodes[1].actions)
    mean, _ = agent.policy(torch.cat([episodes[0].observations[0], z.expand(5, -1)], -1)).chunk(2, -1)
    assert torch.allclose(episodes[0].actions[0], torch.tanh(mean) * 0.1)
    sampled = play_episodes(agent, nav, goals, z, torch.Generator().manual_seed(0))
    assert not torch.equal(sampled.actions, episodes[0].actions)


@pytest.mark.slow
def test_state_round_trip_restores_networks_optimizers_and_replay(ray_session):
    torch.set_num_threads(1)
    spec = JobSpec.model_validate(SMALL)
    pearl = PEARL(spec)
    try:
        metrics = pearl.train_iteration()
        assert sorted(metrics) == ["train/critic_loss", "train/entropy", "train/episode_return",
                                   "train/kl", "train/policy_loss", "train/reward_loss",
                                   "train/temperature"]
        assert pearl.env_steps > 0 and -15 * 1.5 <= metrics["train/episode_return"] <= 0
        # the encoder's context of a collected task: the episodes just collected on it
        for task, context in enumerate(pearl.contexts):
            if context is not None:
                assert context.shape == (2, 15, 7)
                for episode, rows in zip(context, pearl.buffer.data[task]):
                    assert torch.equal(episode[:len(rows)], rows[:, :7])
        tensors, document = pearl.state()
        restored = PEARL(spec)
        restored.load_state(tensors, document)
        again, _ = restored.state()
        assert sorted(again) == sorted(tensors)
        assert all(torch.equal(again[k], tensors[k]) for k in tensors)
        assert (restored.iteration, restored.env_steps) == (1, pearl.env_steps)
        results = restored.evaluate("val")
        assert sorted(results) == ["val/adapted_return", "val/return_episode0", "val/return_episode0_ci95",
                                   "val/return_episode1", "val/return_episode1_ci95",
                                   "val/return_episode1_other_task"]  # too few goals to probe
        assert all(-15 * 1.5 <= v <= 0 for k, v in results.items() if not k.endswith("_ci95"))
    finally:
        pearl.close()


@pytest.mark.parametrize("family", ["bandit", "tabular_mdp"])
def test_pearl_refuses_families_without_continuous_actions(family):
    with pytest.raises(ValueError):
        JobSpec.model_validate({"algorithm": {"name": "pearl"}, "task_family": {"name": family}})


def test_the_temperature_falls_while_the_entropy_is_above_its_target():
    spec = JobSpec.model_validate({**SMALL, "algorithm": {**SMALL["algorithm"], "target_entropy": -50.0}})
    pearl = PEARL(spec)
    episodes = play_episodes(pearl.agent, spec.task_family, pearl.train_goals,
                              torch.randn(4, 5), torch.Generator().manual_seed(0))
    for task in range(4):
        pearl.buffer.add(task, episodes, task)
        pearl.contexts[task] = episodes.transitions()[task][None]
    generator = torch.Generator().manual_seed(1)
    temperatures = [pearl._gradient_step(generator)["temperature"] for _ in range(3)]
    assert temperatures[0] == pytest.approx(1.0)
    assert temperatures[2] < temperatures[1] < temperatures[0]
    fixed = PEARL(JobSpec.model_validate(
        {**SMALL, "algorithm": {**SMALL["algorithm"], "learn_temperature": False, "temperature": 0.2}}))
    fixed.buffer, fixed.contexts = pearl.buffer, pearl.contexts
    assert [fixed._gradient_step(generator)["temperature"] for _ in range(2)] == pytest.approx([0.2, 0.2])


def test_the_encoders_kl_is_the_mean_over_the_meta_batchs_tasks_so_kl_weight_is_per_task():
    """The loss's KL term is kl_weight × mean_t KL(q(z | c_t) ‖ N(0, I)): the same contexts in a
    meta-batch of 3 or of 6 (each twice) give the same term, so kl_weight's meaning does not
    change with meta_batch_size (rlkit sums over tasks: its λ is kl_weight / meta_batch_size)."""
    pearl = PEARL(JobSpec.model_validate(SMALL))
    contexts = [torch.randn(5, 7, generator=torch.Generator().manual_seed(task)) for task in range(3)]
    _, kl = pearl._latent([0, 1, 2], contexts, torch.Generator().manual_seed(0))
    prior = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    per_task = []
    for context in contexts:
        mean, variance = pearl.agent.posterior(context[None])
        posterior = torch.distributions.Normal(mean[0], variance[0].sqrt())
        per_task.append(torch.distributions.kl_divergence(posterior, prior).sum())
    assert len({round(float(k), 5) for k in per_task}) == 3  # a mean differs from a sum and from any one
    assert torch.allclose(kl, sum(per_task) / 3, rtol=1e-5)
    _, doubled = pearl._latent([0, 1, 2, 0, 1, 2], contexts * 2, torch.Generator().manual_seed(0))
    assert torch.allclose(doubled, kl, rtol=1e-6)  # a bigger meta-batch does not weigh it more
    single = pearl._latent([0], contexts[:1], torch.Generator().manual_seed(0))[1]
    assert torch.allclose(single, per_task[0], rtol=1e-5)
    assert JobSpec.model_validate(SMALL).algorithm.kl_weight == 0.1


def test_the_encoder_probe_scores_a_linear_code_near_1_and_noise_at_or_below_0():
    rng = np.random.default_rng(0)
    goals = rng.uniform(-0.5, 0.5, (200, 2))
    code = np.concatenate([goals @ rng.normal(size=(2, 3)), rng.normal(size=(200, 2))], 1)
    assert probe_r2(code + 0.01 * rng.normal(size=code.shape), goals) > 0.98
    assert probe_r2(rng.normal(size=(200, 5)), goals) < 0.05
    # half the goal (x only) is half the variance
    assert probe_r2(goals[:, :1], goals) == pytest.approx(0.5, abs=0.1)


def test_adaptation_gives_the_per_goal_returns_that_evaluate_tasks_averages():
    torch.set_num_threads(1)
    spec = JobSpec.model_validate(SMALL)
    from metaserve.workers.rl.tasks import build_rl_family

    torch.manual_seed(0)
    family = build_rl_family(spec.task_family)
    agent = PEARLAgent(latent_dim=spec.algorithm.latent_dim, hidden=16, max_action=family.max_action)
    tasks = family.sample_tasks(seed=0, split="val", iteration=0, task_indices=range(6))
    controls = []
    returns, means = agent.adaptation(family, tasks, seed=1, episodes=3, controls=controls)
    assert returns.shape == (3, 6) and [m.shape for m in means] == [(6, spec.algorithm.latent_dim)] * 2
    assert [c.shape for c in controls] == [(6,)] * 2
    # the control draws from its own generator: the returns are those without it
    assert agent.evaluate_tasks(family, tasks, seed=1, episodes=3) == pytest.approx(returns.mean(1).tolist())
