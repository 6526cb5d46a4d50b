"""Prompt (context) tuning, CAVIA-style (Zintgraf et al. 2019, "Fast Context Adaptation via
Meta-Learning"): a prompt vector of ``prompt_dim`` zeros, reset for every task, is
concatenated to the network's input (see :mod:`metaserve.workers.networks`); the inner loop adapts only
the prompt, the backbone is meta-learned through it."""

from __future__ import annotations

import torch
from torch import Tensor

from metaserve.workers.algorithms.base import Algorithm, Fast
from metaserve.workers.networks import Params


class Prompt(Algorithm):
    name = "prompt"

    def initial_fast(self, params: Params) -> Fast:
        reference = params["head.bias"]
        return torch.zeros(self.model.prompt_dim, dtype=reference.dtype, device=reference.device)

    def predict(self, params: Params, fast: Fast, x: Tensor, stats_rows: int | None = None) -> Tensor:
        return self.model(params, x, fast, stats_rows)

    def inner_update(self, params: Params, fast: Fast, grads: Fast) -> Fast:
        return fast - self.inner_lr * grads

    def recipe(self) -> dict:
        return {**super().recipe(), "adapts": "prompt", "prompt_dim": self.model.prompt_dim,
                "prompt_init": "zeros", "first_order": self.first_order}
