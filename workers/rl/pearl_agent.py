"""PEARL's agent (Rakelly et al. 2019): the context encoder q(z | c) and the tanh-Gaussian policy
π(a | s, z), what a meta-policy artifact holds; and its episodes on the one nav2d simulator.

- The encoder maps each transition (s, a, r, s') to a Gaussian factor N(μ_i, σ_i²); the
  posterior is their product (σ² = 1/Σ σ_i⁻², μ = σ² Σ μ_i/σ_i²).
- The policy's log-likelihood is corrected for the tanh (actions scaled to ±max_action).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from metaserve.workers.rl.nav2d import Nav2DEpisodes, simulate_nav2d
from metaserve.workers.rl.tasks import Nav2DFamily, Task
from metaserve.workers.spec import JobSpec, Nav2DSpec

OBSERVATION_SIZE = 2
ACTION_SIZE = 2
TRANSITION_SIZE = 2 * OBSERVATION_SIZE + ACTION_SIZE + 1  # (s, a, r, s')
LOG_STD_RANGE = (-20.0, 2.0)
MIN_VARIANCE = 1e-7


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PEARLAgent(nn.Module):
    """Encoder + tanh-Gaussian policy (what a meta-policy artifact holds), plain torch."""

    def __init__(self, latent_dim: int, hidden: int, max_action: float):
        super().__init__()
        self.latent_dim, self.max_action = latent_dim, max_action
        self.encoder = mlp([TRANSITION_SIZE, hidden, hidden, 2 * latent_dim])
        self.policy = mlp([OBSERVATION_SIZE + latent_dim, hidden, hidden, 2 * ACTION_SIZE])

    def posterior(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Product of Gaussian factors over a context [T, N, transition] → (μ, σ²) [T, latent]."""
        mean, raw = self.encoder(context).chunk(2, dim=-1)
        variance = nn.functional.softplus(raw).clamp_min(MIN_VARIANCE)
        posterior_variance = 1.0 / (1.0 / variance).sum(1)
        return posterior_variance * (mean / variance).sum(1), posterior_variance

    def act(self, observation: Tensor, z: Tensor, *, deterministic: bool = False,
            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Action (scaled to ±max_action) and its log-probability (tanh-corrected)."""
        mean, log_std = self.policy(torch.cat([observation, z], -1)).chunk(2, dim=-1)
        log_std = log_std.clamp(*LOG_STD_RANGE)
        noise = torch.randn(mean.shape, generator=generator) if generator is not None else torch.randn_like(mean)
        pre_tanh = mean if deterministic else mean + log_std.exp() * noise
        log_prob = (-0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std
                    - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - pre_tanh - nn.functional.softplus(-2 * pre_tanh))).sum(-1)
        return torch.tanh(pre_tanh) * self.max_action, log_prob

    @classmethod
    def from_tensors(cls, spec: JobSpec, tensors: dict[str, Tensor]) -> "PEARLAgent":
        agent = cls(spec.algorithm.latent_dim, spec.algorithm.hidden, spec.task_family.max_action)
        agent.load_state_dict(tensors)
        agent.nav = spec.task_family
        agent.adaptation_episodes = spec.algorithm.adaptation_episodes
        return agent

    @torch.no_grad()
    def sample_z(self, context: Tensor | None, tasks: int, generator: torch.Generator) -> Tensor:
        """z ~ N(0, I) without context, else z ~ q(z | context) (context [T, N, transition])."""
        if context is None:
            return torch.randn(tasks, self.latent_dim, generator=generator)
        mean, variance = self.posterior(context)
        return mean + variance.sqrt() * torch.randn(mean.shape, generator=generator)

    @torch.no_grad()
    def evaluate_tasks(self, family: Nav2DFamily, tasks: list[Task], *, seed: int,
                       episodes: int | None = None) -> list[float]:
        """Mean adapted return over ``tasks`` after 0, 1, …, ``episodes`` − 1 exploration
        episodes (:meth:`adaptation`)."""
        returns, _ = self.adaptation(family, tasks, seed=seed, episodes=episodes)
        return returns.mean(1).tolist()

    @torch.no_grad()
    def adaptation(self, family: Nav2DFamily, tasks: list[Task], *, seed: int,
                   episodes: int | None = None, controls: list[Tensor] | None = None
                   ) -> tuple[Tensor, list[Tensor]]:
        """Per-task adapted returns [episodes, tasks] after 0, 1, …, ``episodes`` − 1
        exploration episodes, and the posterior mean [tasks, latent] after each of 1, …,
        ``episodes`` − 1 of them (what an encoder probe reads). ``controls``, when a list, gets
        after each of 1, …, ``episodes`` − 1 episodes the per-task return [tasks] with z drawn
        from the posterior of the *next* task's context (task i + 1, cyclically): what the
        posterior's spread alone is worth, without this task's information (its own
        generator, so the other returns do not change).

        Exploration episode i runs the policy's sampled actions with z from the posterior on
        episodes 0..i−1 (the prior for i = 0), as in training; the return after i of them is
        that of an evaluation episode with the policy's mean action and the same z.
        """
        goals = torch.from_numpy(np.stack([t["goal"] for t in tasks])).float()
        generator = torch.Generator().manual_seed(seed)
        count = episodes or getattr(self, "adaptation_episodes", 2)
        returns, means, context = [], [], None
        for index in range(count):
            z = self.sample_z(context, len(tasks), generator)
            evaluation = play_episodes(self, family.spec, goals, z, generator, deterministic=True)
            returns.append(evaluation.rewards.sum(1))
            if index < count - 1:
                explored = play_episodes(self, family.spec, goals, z, generator).transitions()
                context = explored if context is None else torch.cat([context, explored], 1)
                means.append(self.posterior(context)[0])
                if controls is not None:
                    control = torch.Generator().manual_seed(seed + 1 + index)
                    z_other = self.sample_z(context.roll(-1, 0), len(tasks), control)
                    controls.append(play_episodes(self, family.spec, goals, z_other, control,
                                                  deterministic=True).rewards.sum(1))
        return torch.stack(returns), means


def probe_r2(features: np.ndarray, targets: np.ndarray, folds: int = 5) -> float:
    """Cross-fitted R² of a linear probe (least squares with an intercept) from ``features``
    [N, d] to ``targets`` [N, m]: each of ``folds`` interleaved folds is predicted by the fit on
    the others; 1 − Σ squared error / Σ squared deviation from the targets' mean, over all
    outputs. 0: no better than the mean; 1: the targets are a linear function of the features."""
    features = np.concatenate([np.asarray(features, dtype=np.float64), np.ones((len(features), 1))], 1)
    targets = np.asarray(targets, dtype=np.float64)
    predictions = np.empty_like(targets)
    for fold in range(folds):
        held = np.arange(len(targets)) % folds == fold
        weights, *_ = np.linalg.lstsq(features[~held], targets[~held], rcond=None)
        predictions[held] = features[held] @ weights
    return float(1 - ((predictions - targets) ** 2).sum() / ((targets - targets.mean(0)) ** 2).sum())


def play_episodes(agent: PEARLAgent, nav: Nav2DSpec, goals: Tensor, z: Tensor,
                  generator: torch.Generator, *, deterministic: bool = False) -> Nav2DEpisodes:
    """One episode of every task ``goals`` [T, 2] with its ``z`` [T, latent], all at once;
    ``deterministic``: the policy's mean action (evaluation), else a sampled one."""

    def act(position: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        action, _ = agent.act(position, z, deterministic=deterministic, generator=generator)
        return action, {}

    return simulate_nav2d(act, goals, nav.horizon, nav.max_action)
