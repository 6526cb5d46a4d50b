"""MAML-RL's advantages: GAE(γ, λ) (Schulman et al. 2016) over rllab's linear feature baseline
fitted per task (the baseline of the MAML paper's code), normalized per task over the steps
taken."""

from __future__ import annotations

import torch
from torch import Tensor

from metaserve.workers.rl.rollouts import Trajectories

BASELINE_RIDGE = 1e-5
RIDGE_RETRIES = (1.0, 10.0, 100.0, 1000.0)  # rllab's retry on ill-conditioning


def discounted_returns(t: Trajectories, gamma: float) -> Tensor:
    """Σ_k γ^k r_{t+k} within each episode, [T, E, H]."""
    tasks, episodes, horizon = t.rewards.shape
    returns = torch.zeros_like(t.rewards)
    running = torch.zeros(tasks, episodes)
    for step in reversed(range(horizon)):
        running = t.rewards[..., step] + gamma * running * t.mask[..., step]
        returns[..., step] = running
    return returns


def linear_feature_baseline(t: Trajectories, returns: Tensor) -> Tensor:
    """Per task, the ridge regression of the returns on [s, s², t, t², t³, 1] (observations
    clipped to ±10, time in units of 100 steps), evaluated on the steps taken."""
    tasks, episodes, horizon = t.rewards.shape
    time = torch.arange(horizon, dtype=torch.float32).expand(tasks, episodes, horizon)[..., None] / 100
    obs = t.observations.clamp(-10, 10)
    features = torch.cat([obs, obs ** 2, time, time ** 2, time ** 3, torch.ones_like(time)], -1)
    features = features * t.mask[..., None]
    x = features.reshape(tasks, -1, features.shape[-1])
    y = (returns * t.mask).reshape(tasks, -1, 1)
    eye = torch.eye(x.shape[-1]) * BASELINE_RIDGE
    gram = x.transpose(1, 2) @ x
    for ridge in RIDGE_RETRIES:
        try:
            weights = torch.linalg.solve(gram + ridge * eye, x.transpose(1, 2) @ y)
            break
        except RuntimeError:
            continue
    return (x @ weights).reshape(tasks, episodes, horizon) * t.mask


def gae_advantages(t: Trajectories, gamma: float, lam: float) -> Tensor:
    """GAE(γ, λ) over :func:`linear_feature_baseline`, normalized per task."""
    tasks, episodes, _ = t.rewards.shape
    baseline = linear_feature_baseline(t, discounted_returns(t, gamma))
    next_baseline = torch.cat([baseline[..., 1:], torch.zeros(tasks, episodes, 1)], -1)
    deltas = (t.rewards + gamma * next_baseline - baseline) * t.mask
    advantages = torch.zeros_like(deltas)
    running = torch.zeros(tasks, episodes)
    for step in reversed(range(t.rewards.shape[-1])):
        running = deltas[..., step] + gamma * lam * running * t.mask[..., step]
        advantages[..., step] = running
    count = t.mask.sum((1, 2), keepdim=True).clamp_min(1)
    mean = (advantages * t.mask).sum((1, 2), keepdim=True) / count
    var = ((advantages - mean) ** 2 * t.mask).sum((1, 2), keepdim=True) / count
    return (advantages - mean) / (var.sqrt() + 1e-8) * t.mask
