"""MAML-RL's rollouts: ``episodes`` episodes of each of ``T`` tasks with per-task Gaussian policy
parameters ``[T, ...]``, as :class:`Trajectories` ``[T, E, H, ·]``.

On ``nav2d`` every task and episode is simulated at once by the one nav2d simulator
(:func:`~metaserve.workers.rl.nav2d.simulate_nav2d`); other families step one gymnasium env per
(task, episode), reused across calls, in lockstep, the policy evaluated for all of them in one
call. With ``action_scale`` the policy acts in [-1, 1] units scaled to the family's max action
(rllab's ``normalize`` wrapper). The noise and the envs' initial states are drawn from
``generator``, so a rollout is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from metaserve.workers.rl.nav2d import simulate_nav2d
from metaserve.workers.rl.policies import gaussian_log_prob
from metaserve.workers.rl.tasks import RLTaskFamily

Params = dict[str, Tensor]
# policy(per-task params [T, ...], observations [T, E, obs]) -> (means, log stds) [T, E, act]
TaskPolicies = Callable[[Params, Tensor], "tuple[Tensor, Tensor]"]


@dataclass
class Trajectories:
    """Rollouts of ``T`` tasks × ``E`` episodes × ``H`` steps."""

    observations: Tensor  # [T, E, H, observation size]
    actions: Tensor  # [T, E, H, action size], in the policy's units
    rewards: Tensor  # [T, E, H] (0 after the episode ended)
    mask: Tensor  # [T, E, H] float, 1 while the episode runs
    log_probs: Tensor  # [T, E, H] of the sampling policy
    advantages: Tensor | None = None  # [T, E, H]

    @property
    def episode_returns(self) -> Tensor:  # [T, E]
        return self.rewards.sum(-1)

    @property
    def steps(self) -> int:
        return int(self.mask.sum())


def _sample(policy: TaskPolicies, task_params: Params, observation: Tensor,
            generator: torch.Generator) -> tuple[Tensor, Tensor]:
    mean, log_std = policy(task_params, observation)
    action = mean + log_std.exp() * torch.randn(mean.shape, generator=generator)
    return action, gaussian_log_prob(mean, log_std, action)


@torch.no_grad()
def rollout_nav2d(policy: TaskPolicies, task_params: Params, goals: Tensor, episodes: int,
                  generator: torch.Generator, *, horizon: int, max_action: float,
                  action_scale: float) -> Trajectories:
    """``goals`` [T, 2]: each task's goal position."""
    tasks = goals.shape[0]

    def act(position: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        action, log_prob = _sample(policy, task_params, position, generator)
        return action * action_scale, {"action": action, "log_prob": log_prob}

    run = simulate_nav2d(act, goals[:, None, :].expand(tasks, episodes, 2), horizon, max_action)
    return Trajectories(run.observations, run.extras["action"], run.rewards, run.mask,
                        run.extras["log_prob"])


@torch.no_grad()
def rollout_envs(policy: TaskPolicies, task_params: Params, goals: Tensor, episodes: int,
                 generator: torch.Generator, *, family: RLTaskFamily, envs: list,
                 action_scale: float) -> Trajectories:
    """``goals`` [T, ·]: each task's ``goal``; ``envs``: the family's envs made so far (grown
    here as needed, to be closed by the caller)."""
    tasks = goals.shape[0]
    count = tasks * episodes
    while len(envs) < count:
        envs.append(family.make_env())
    envs = envs[:count]
    seeds = torch.randint(2**31 - 1, (count,), generator=generator).tolist()
    first = []
    for index, env in enumerate(envs):
        env.set_task({"goal": goals[index // episodes].numpy().astype(np.float64)})
        first.append(env.reset(seed=seeds[index])[0])
    observation = torch.from_numpy(np.stack(first)).float().reshape(tasks, episodes, -1)
    alive = torch.ones(tasks, episodes, dtype=torch.bool)
    trace: dict[str, list[Tensor]] = {k: [] for k in ("obs", "act", "rew", "mask", "logp")}
    limit = family.max_action
    for _ in range(family.max_episode_steps):
        action, log_prob = _sample(policy, task_params, observation, generator)
        applied = (action * action_scale).clamp(-limit, limit).reshape(count, -1).numpy()
        running = alive.reshape(-1).tolist()
        observations, rewards = [], np.zeros(count)
        ended = np.zeros(count, dtype=bool)
        for index, env in enumerate(envs):
            if not running[index]:
                observations.append(observation.reshape(count, -1)[index].numpy())
                continue
            next_observation, reward, terminated, truncated, _ = env.step(applied[index])
            observations.append(next_observation)
            rewards[index] = reward
            ended[index] = terminated or truncated
        mask = alive.float()
        trace["obs"].append(observation)
        trace["act"].append(action)
        trace["rew"].append(torch.from_numpy(rewards).float().reshape(tasks, episodes) * mask)
        trace["mask"].append(mask)
        trace["logp"].append(log_prob)
        observation = torch.from_numpy(np.stack(observations)).float().reshape(tasks, episodes, -1)
        alive = alive & ~torch.from_numpy(ended).reshape(tasks, episodes)
    stacked = {k: torch.stack(v, dim=2) for k, v in trace.items()}
    return Trajectories(stacked["obs"], stacked["act"], stacked["rew"], stacked["mask"],
                        stacked["logp"])
