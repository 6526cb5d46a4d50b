"""The one nav2d simulator (Finn et al. 2017, §5.3, as in their rllab code): a point robot
starts at the origin, each action moves it by the action clipped to ±``max_action`` per axis,
the reward is minus the distance to the goal after the move, and the episode ends within
``GOAL_TOLERANCE`` of the goal on both axes or after ``horizon`` steps.

:func:`nav2d_step` is the dynamics; :class:`Nav2DEnv` (gymnasium, one task, float64) and
:func:`simulate_nav2d` (torch, any batch of tasks × episodes at once: MAML-RL's and PEARL's
rollouts) both step with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

GOAL_TOLERANCE = 0.01


def nav2d_step(position: Tensor, action: Tensor, goal: Tensor, max_action: float
               ) -> tuple[Tensor, Tensor, Tensor]:
    """``(next position, reward, goal reached)`` of one move, for any batch shape ``[..., 2]``."""
    moved = position + action.clamp(-max_action, max_action)
    offset = moved - goal
    return moved, -offset.norm(dim=-1), (offset.abs() < GOAL_TOLERANCE).all(-1)


@dataclass
class Nav2DEpisodes:
    """Episodes of a batch of tasks: arrays ``[*batch, horizon, ·]``; steps after an episode
    ended are masked out (``mask`` 0, reward 0, position held)."""

    observations: Tensor
    actions: Tensor  # as the policy returned them (before the env's clipping)
    rewards: Tensor
    next_observations: Tensor
    dones: Tensor  # 1.0 where the step reached the goal
    mask: Tensor  # 1.0 while the episode runs
    extras: dict[str, Tensor] = field(default_factory=dict)  # what the policy asked to record

    def transitions(self) -> Tensor:
        """(s, a, r, s') of every step taken, ``[*batch, horizon, 7]`` (steps after the end
        repeat the last one)."""
        rows = torch.cat([self.observations, self.actions, self.rewards[..., None],
                          self.next_observations], -1)
        time_axis = self.mask.dim() - 1
        last = self.mask.sum(time_axis).long().clamp_min(1) - 1
        steps = torch.arange(self.mask.shape[time_axis])
        index = torch.minimum(steps, last[..., None])
        return torch.gather(rows, time_axis, index[..., None].expand(*index.shape, rows.shape[-1]))


# policy(observations [*batch, 2]) -> (actions in env units [*batch, 2], {name: per-step value})
BatchPolicy = Callable[[Tensor], "tuple[Tensor, dict[str, Tensor]]"]


@torch.no_grad()
def simulate_nav2d(policy: BatchPolicy, goals: Tensor, horizon: int, max_action: float) -> Nav2DEpisodes:
    """One episode per entry of ``goals`` ``[*batch, 2]``, all stepped at once."""
    position = torch.zeros(goals.shape)
    alive = torch.ones(goals.shape[:-1], dtype=torch.bool)
    trace: dict[str, list[Tensor]] = {key: [] for key in ("obs", "act", "rew", "next", "done", "mask")}
    extras: dict[str, list[Tensor]] = {}
    for _ in range(horizon):
        action, recorded = policy(position)
        moved, reward, reached = nav2d_step(position, action, goals, max_action)
        running = alive.float()
        for key, value in (("obs", position), ("act", action), ("rew", reward * running),
                           ("next", moved), ("done", reached.float()), ("mask", running)):
            trace[key].append(value)
        for key, value in recorded.items():
            extras.setdefault(key, []).append(value)
        position = torch.where(alive[..., None], moved, position)
        alive = alive & ~reached
    axis = goals.dim() - 1  # the time axis goes after the batch axes
    stacked = {key: torch.stack(values, dim=axis) for key, values in trace.items()}
    return Nav2DEpisodes(stacked["obs"], stacked["act"], stacked["rew"], stacked["next"],
                         stacked["done"], stacked["mask"],
                         {key: torch.stack(values, dim=axis) for key, values in extras.items()})


class Nav2DEnv(gym.Env):
    """One nav2d task as a gymnasium env: observation the position, reward −distance to the
    goal after the move (:func:`nav2d_step` in float64)."""

    def __init__(self, horizon: int, max_action: float):
        self.horizon, self.max_action = horizon, max_action
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-max_action, max_action, (2,), np.float32)
        self.task: dict[str, np.ndarray] | None = None
        self.position = np.zeros(2)
        self.steps = 0

    def set_task(self, task: dict[str, np.ndarray]) -> None:
        self.task = task

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position, self.steps = np.zeros(2), 0
        return self.position.astype(np.float32), {}

    def step(self, action):  # noqa: ANN001
        moved, reward, reached = nav2d_step(
            torch.from_numpy(self.position), torch.as_tensor(np.asarray(action), dtype=torch.float64),
            torch.as_tensor(self.task["goal"], dtype=torch.float64), self.max_action)
        self.position = moved.numpy()
        self.steps += 1
        reached = bool(reached)
        return (self.position.astype(np.float32), float(reward), reached,
                self.steps >= self.horizon and not reached, {})
