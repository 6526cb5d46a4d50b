"""Evaluation on held-out tasks: loss (MSE or cross-entropy) and accuracy before adaptation and
after each requested number of inner steps, as mean and 95 % confidence half-width
(normal approximation, 1.96·s/√n, as reported by Finn et al. 2017)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

Z_95 = 1.959963984540054


def mean_and_ci95(values: Tensor) -> tuple[float, float]:
    values = values.double()
    count = values.numel()
    mean = float(values.mean())
    if count < 2:
        return mean, float("nan")
    return mean, Z_95 * float(values.std(unbiased=True)) / math.sqrt(count)


def summarize(split: str, steps: list[int], losses: Tensor, accuracies: Tensor | None) -> dict[str, float]:
    """``{split}/loss_step{k}`` and ``..._ci95`` (and accuracy) from per-task ``[T, len(steps)]``."""
    result: dict[str, float] = {}
    for column, step in enumerate(steps):
        mean, ci = mean_and_ci95(losses[:, column])
        result[f"{split}/loss_step{step}"] = mean
        result[f"{split}/loss_step{step}_ci95"] = ci
        if accuracies is not None:
            mean, ci = mean_and_ci95(accuracies[:, column])
            result[f"{split}/accuracy_step{step}"] = mean
            result[f"{split}/accuracy_step{step}_ci95"] = ci
    result[f"{split}/tasks"] = float(losses.shape[0])
    return result
