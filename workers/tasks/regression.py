"""Regression task families: sine (Finn et al. 2017) and linear.

Sampling is vectorized over the tasks of a batch and still counter-based: every random
number of task ``t`` is ``splitmix64(task_seed(seed, split, iteration, t) + k·γ)`` for a
fixed counter ``k`` (Steele et al. 2014, "Fast splittable pseudorandom number generators"),
computed for all tasks and points at once with int64 tensor arithmetic. Task ``t`` is thus
the same whichever shard samples it, and query point ``j`` does not depend on the number of
support shots (query points come first in the counter layout).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from metaserve.workers.spec import LinearSpec, SineSpec
from metaserve.workers.tasks.base import TaskBatch, task_seed

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MIX_1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX_2 = 0x94D049BB133111EB - 2**64
_FLOAT_BITS = 24  # float32 represents k / 2**24 exactly, so uniforms lie in [0, 1)


def _shift_right_logical(z: Tensor, bits: int) -> Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(keys: Tensor, count: int) -> Tensor:
    """``[T, count]`` float32 uniforms in [0, 1): splitmix64 of ``key + (k + 1)·γ``, k < count.

    ``keys`` is an int64 ``[T]`` tensor of per-task seeds; int64 arithmetic wraps.
    """
    counters = torch.arange(1, count + 1, dtype=torch.int64)
    z = keys[:, None] + counters[None, :] * _GOLDEN_GAMMA
    z = (z ^ _shift_right_logical(z, 30)) * _MIX_1
    z = (z ^ _shift_right_logical(z, 27)) * _MIX_2
    z = z ^ _shift_right_logical(z, 31)
    return _shift_right_logical(z, 64 - _FLOAT_BITS).to(torch.float32) / float(1 << _FLOAT_BITS)


def _task_keys(seed: int, split: str, iteration: int, task_indices: Sequence[int]) -> Tensor:
    return torch.tensor([task_seed(seed, split, iteration, int(t)) for t in task_indices], dtype=torch.int64)


def _scale(u: Tensor, bounds: tuple[float, float]) -> Tensor:
    low, high = bounds
    return low + (high - low) * u


class _RegressionFamily:
    input_shape = (1,)
    output_dim = 1
    is_classification = False
    # per point: x, then two uniforms for Box–Muller noise; after PARAMETERS task parameters
    PARAMETERS = 2
    PER_POINT = 1

    def __init__(self, spec: SineSpec | LinearSpec):
        self.spec = spec

    def _draw(self, seed: int, split: str, iteration: int, task_indices: Sequence[int],
              support_shots: int | None) -> tuple[Tensor, Tensor, int, int]:
        support = self.spec.support_shots if support_shots is None else support_shots
        query = self.spec.query_shots
        keys = _task_keys(seed, split, iteration, task_indices)
        u = counter_uniform(keys, self.PARAMETERS + self.PER_POINT * (query + support))
        points = u[:, self.PARAMETERS:].reshape(len(task_indices), query + support, self.PER_POINT)
        return u[:, : self.PARAMETERS], points, support, query

    def _batch(self, x: Tensor, y: Tensor, support: int, query: int) -> TaskBatch:
        x, y = x[..., None], y[..., None]
        return TaskBatch(x[:, query:].contiguous(), y[:, query:].contiguous(),
                         x[:, :query].contiguous(), y[:, :query].contiguous())


class SineFamily(_RegressionFamily):
    """y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5] (Finn et al. 2017)."""

    def __init__(self, spec: SineSpec):
        super().__init__(spec)

    def sample(self, *, seed: int, split: str, iteration: int, task_indices: Sequence[int],
               support_shots: int | None = None) -> TaskBatch:
        params, points, support, query = self._draw(seed, split, iteration, task_indices, support_shots)
        amplitude = _scale(params[:, 0:1], self.spec.amplitude)
        phase = _scale(params[:, 1:2], self.spec.phase)
        x = _scale(points[..., 0], self.spec.x_range)
        return self._batch(x, amplitude * torch.sin(x - phase), support, query)


class LinearFamily(_RegressionFamily):
    """y = a·x + b + ε, a and b uniform in their ranges, ε ~ N(0, noise_std²) (Box–Muller)."""

    PER_POINT = 3

    def __init__(self, spec: LinearSpec):
        super().__init__(spec)

    def sample(self, *, seed: int, split: str, iteration: int, task_indices: Sequence[int],
               support_shots: int | None = None) -> TaskBatch:
        params, points, support, query = self._draw(seed, split, iteration, task_indices, support_shots)
        slope = _scale(params[:, 0:1], self.spec.slope)
        intercept = _scale(params[:, 1:2], self.spec.intercept)
        x = _scale(points[..., 0], self.spec.x_range)
        y = slope * x + intercept
        if self.spec.noise_std > 0:
            radius = torch.sqrt(-2.0 * torch.log1p(-points[..., 1]))  # 1 − u ∈ (0, 1]
            y = y + self.spec.noise_std * radius * torch.cos(2.0 * math.pi * points[..., 2])
        return self._batch(x, y, support, query)
