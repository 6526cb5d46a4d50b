"""Functional outer optimizers on parameter dicts: state is a flat dict of tensors, so it
goes into a safetensors checkpoint as is, and a step is a pure function (nothing mutated).

Adam follows Kingma & Ba 2015 (the same arithmetic as ``torch.optim.Adam`` with default
betas/eps, without weight decay), per tensor:
m ← lerp(m, g, 1 − β1); v ← v·β2 + ((1 − β2)·g)·g; θ ← θ − ((lr / bc1)·m) / (√v / √bc2 + ε),
computed with ``torch._foreach_*`` over all tensors at once; SGD is θ ← θ − lr·g.
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
        # one foreach call per operation over all tensors (fewer Python-level ops); the same
        # arithmetic, element by element, as the per-tensor form in the module docstring
        names = list(params)
        grad_list = [grads[name] for name in names]
        exp_avgs = torch._foreach_lerp([state[f"exp_avg.{name}"] for name in names], grad_list, 1.0 - beta1)
        exp_avg_sqs = torch._foreach_add(
            torch._foreach_mul([state[f"exp_avg_sq.{name}"] for name in names], beta2),
            torch._foreach_mul(torch._foreach_mul(grad_list, 1.0 - beta2), grad_list))
        denominators = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs),
                                                             bias_correction2_sqrt), ADAM_EPS)
        updates = torch._foreach_div(torch._foreach_mul(exp_avgs, spec.lr / bias_correction1), denominators)
        new_params = dict(zip(names, torch._foreach_sub([params[name] for name in names], updates)))
        new_state: dict[str, Tensor] = {STEP_KEY: step}
        for name, exp_avg, exp_avg_sq in zip(names, exp_avgs, exp_avg_sqs):
            new_state[f"exp_avg.{name}"] = exp_avg
            new_state[f"exp_avg_sq.{name}"] = exp_avg_sq
        return new_params, new_state
