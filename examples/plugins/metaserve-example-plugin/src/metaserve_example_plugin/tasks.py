"""``oscillator``: regression on damped oscillations, one task per oscillator.

A task is ``y(t) = A · exp(−γ t) · cos(ω t + φ) + ε`` with amplitude ``A``, damping ``γ``,
angular frequency ``ω`` and phase ``φ`` drawn uniformly from their ranges, times ``t`` uniform in
``t_range`` and Gaussian noise ``ε ~ N(0, noise_std²)``: a harder cousin of MAML's sine family
(Finn et al. 2017), whose tasks differ in how fast they decay as well as in shape.

Counter-seeded like the built-in families: task ``i`` of iteration ``k`` on a split is drawn from
its own generator (:func:`metaserve.workers.tasks.base.task_generator`), so it is the same
whichever worker samples it; its query points are drawn before its support points, so they do
not change with the number of support shots.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from pydantic import Field, StrictInt, model_validator

from metaserve.workers.spec_base import StrictModel
from metaserve.workers.tasks.base import TaskBatch, task_generator

Range = tuple[float, float]


class DampedOscillatorSpec(StrictModel):
    """Damped oscillations y = A·exp(−γt)·cos(ωt + φ) + noise, one oscillator per task."""

    name: Literal["oscillator"] = "oscillator"
    support_shots: StrictInt = Field(10, ge=1, le=1000, description="Support points per task.")
    query_shots: StrictInt = Field(10, ge=1, le=1000, description="Query points per task.")
    amplitude: Range = Field((0.5, 2.0), description="Amplitude A ~ U[low, high].")
    damping: Range = Field((0.1, 0.6), description="Damping rate γ ~ U[low, high] (per unit time).")
    frequency: Range = Field((0.5, 1.5), description="Angular frequency ω ~ U[low, high].")
    phase: Range = Field((0.0, math.pi), description="Phase φ ~ U[low, high].")
    t_range: Range = Field((0.0, 5.0), description="Times t ~ U[low, high].")
    noise_std: float = Field(0.0, ge=0.0, le=10.0, description="Std of Gaussian noise on y.")

    @model_validator(mode="after")
    def _ranges(self) -> "DampedOscillatorSpec":
        for field in ("amplitude", "damping", "frequency", "phase", "t_range"):
            low, high = getattr(self, field)
            if not low <= high:
                raise ValueError(f"{field}: lower bound {low} is above upper bound {high}")
        if self.damping[0] < 0:
            raise ValueError("damping: rates must be >= 0 (a negative rate grows without bound)")
        return self

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's input: the time t."""
        return (1,)

    @property
    def output_dim(self) -> int:
        return 1


def _scale(u: torch.Tensor, bounds: Range) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * u


class DampedOscillatorFamily:
    """The sampler of :class:`DampedOscillatorSpec` tasks (metaserve's TaskFamily interface)."""

    Spec = DampedOscillatorSpec
    input_shape = (1,)
    output_dim = 1
    is_classification = False

    def __init__(self, spec: DampedOscillatorSpec):
        self.spec = spec

    def sample(self, *, seed: int, split: str, iteration: int, task_indices: Sequence[int],
               support_shots: int | None = None) -> TaskBatch:
        support = self.spec.support_shots if support_shots is None else support_shots
        query = self.spec.query_shots
        xs, ys = [], []
        for task in task_indices:
            generator = task_generator(seed, split, iteration, int(task))
            amplitude, damping, frequency, phase = (
                _scale(u, bounds) for u, bounds in zip(
                    torch.rand(4, generator=generator),
                    (self.spec.amplitude, self.spec.damping, self.spec.frequency, self.spec.phase)))
            # query first: their points do not depend on the number of support shots
            t = torch.cat([_scale(torch.rand(query, generator=generator), self.spec.t_range),
                           _scale(torch.rand(support, generator=generator), self.spec.t_range)])
            noise = torch.cat([torch.randn(query, generator=generator),
                               torch.randn(support, generator=generator)])
            y = amplitude * torch.exp(-damping * t) * torch.cos(frequency * t + phase)
            xs.append(t)
            ys.append(y + self.spec.noise_std * noise)
        x, y = torch.stack(xs)[..., None], torch.stack(ys)[..., None]
        return TaskBatch(x[:, query:].contiguous(), y[:, query:].contiguous(),
                         x[:, :query].contiguous(), y[:, :query].contiguous())
