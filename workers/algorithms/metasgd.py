"""Meta-SGD (Li et al. 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning"):
every parameter has its own inner learning rate α (same shape), learned with θ:
θ' = θ − α ⊙ ∇L_support(θ). The rates are meta-parameters named ``inner_lr.<param>``,
initialized to ``spec.inner_lr``, and are part of the artifact."""

from __future__ import annotations

import torch

from metaserve.workers.algorithms.base import Algorithm, Fast
from metaserve.workers.networks import Params

LR_PREFIX = "inner_lr."


class MetaSGD(Algorithm):
    name = "metasgd"

    def init_params(self, generator: torch.Generator) -> Params:
        params = self.model.init_params(generator)
        rates = {LR_PREFIX + name: torch.full_like(value, self.inner_lr) for name, value in params.items()}
        return {**params, **rates}

    def model_params(self, params: Params) -> Params:
        return {name: value for name, value in params.items() if not name.startswith(LR_PREFIX)}

    def initial_fast(self, params: Params) -> Fast:
        return self.model_params(params)

    def inner_update(self, params: Params, fast: Fast, grads: Fast) -> Fast:
        return {name: value - params[LR_PREFIX + name] * grads[name] for name, value in fast.items()}

    def recipe(self) -> dict:
        recipe = super().recipe()
        del recipe["inner_lr"]
        return {**recipe, "learned_lrs": True, "lr_prefix": LR_PREFIX, "first_order": self.first_order}
