"""PEARL's replay: per-task transition storage (Rakelly et al. 2019 keep one buffer per training
task), rows ``[s, a, r, s', done]`` of the steps taken, sampled uniformly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metaserve.workers.rl.nav2d import Nav2DEpisodes


@dataclass
class Transitions:
    """A batch of transitions ``[..., n, ·]``, named (a replay row split by its layout)."""

    observations: Tensor
    actions: Tensor
    rewards: Tensor  # [..., n]
    next_observations: Tensor
    dones: Tensor  # [..., n], 1.0 where the step ended the episode at its goal

    @classmethod
    def from_rows(cls, rows: Tensor, observation_size: int, action_size: int) -> "Transitions":
        """Split rows laid out as :meth:`ReplayBuffer.add` writes them."""
        observations, actions, rewards, next_observations, dones = rows.split(
            [observation_size, action_size, 1, observation_size, 1], dim=-1)
        return cls(observations, actions, rewards[..., 0], next_observations, dones[..., 0])


class ReplayBuffer:
    """Per-task transition storage (grows; a task's rows are concatenated once per change)."""

    def __init__(self, tasks: int):
        self.data: list[list[Tensor]] = [[] for _ in range(tasks)]
        self.cache: list[Tensor | None] = [None] * tasks

    def add(self, task: int, episodes: Nav2DEpisodes, row: int) -> None:
        """The steps taken in episode ``row`` of ``episodes``, as rows [s, a, r, s', done]."""
        valid = episodes.mask[row] > 0
        rows = torch.cat([episodes.observations[row], episodes.actions[row],
                          episodes.rewards[row, :, None], episodes.next_observations[row],
                          episodes.dones[row, :, None]], -1)[valid]
        self.data[task].append(rows)
        self.cache[task] = None

    def all(self, task: int) -> Tensor:
        if self.cache[task] is None:
            self.cache[task] = torch.cat(self.data[task])
        return self.cache[task]

    def sample(self, task: int, count: int, generator: torch.Generator) -> Tensor:
        """``count`` rows of ``task``, uniformly with replacement."""
        rows = self.all(task)
        return rows[torch.randint(len(rows), (count,), generator=generator)]

    def __len__(self) -> int:
        return sum(len(self.all(t)) for t in range(len(self.data)) if self.data[t])
