"""Functional outer optimizers on parameter dicts: state is a flat dict of tensors, so it
goes into a safetensors checkpoint as is, and a step is a pure function (nothing mutated).

Adam follows Kingma & Ba 2015 (the same arithmetic as ``torch.optim.Adam`` with default
betas/eps, without weight decay); SGD is θ ← θ − lr·g.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaserve.workers.spec import OuterOptimizerSpec

Params = dict[str, Tensor]
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
STEP_KEY = "step"


def init_optimizer_state(spec: OuterOptimizerSpec, params: Params) -> dict[str, Tensor]:
    if spec.name == "sgd":
        return {}
    state = {STEP_KEY: torch.zeros((), dtype=torch.int64)}
    for name, value in params.items():
        state[f"exp_avg.{name}"] = torch.zeros_like(value)
        state[f"exp_avg_sq.{name}"] = torch.zeros_like(value)
    return state


def optimizer_step(spec: OuterOptimizerSpec, params: Params, grads: Params,
                   state: dict[str, Tensor]) -> tuple[Params, dict[str, Tensor]]:
    """One outer step; returns new ``(params, state)``."""
    with torch.no_grad():
        if spec.name == "sgd":
            return {name: value - spec.lr * grads[name] for name, value in params.items()}, {}
        beta1, beta2 = ADAM_BETAS
        step = state[STEP_KEY] + 1
        step_number = int(step)
        bias_correction1 = 1.0 - beta1**step_number
        bias_correction2_sqrt = (1.0 - beta2**step_number) ** 0.5
        new_params: Params = {}
        new_state: dict[str, Tensor] = {STEP_KEY: step}
        for name, value in params.items():
            grad = grads[name]
            exp_avg = state[f"exp_avg.{name}"].lerp(grad, 1.0 - beta1)
            exp_avg_sq = state[f"exp_avg_sq.{name}"] * beta2 + (1.0 - beta2) * grad * grad
            denominator = exp_avg_sq.sqrt() / bias_correction2_sqrt + ADAM_EPS
            new_params[name] = value - (spec.lr / bias_correction1) * exp_avg / denominator
            new_state[f"exp_avg.{name}"] = exp_avg
            new_state[f"exp_avg_sq.{name}"] = exp_avg_sq
        return new_params, new_state
