"""The foreach Adam (workers/engine/optimizers.py) against the per-tensor arithmetic it replaced:
bit for bit, so checkpoints and runs from before the change continue identically."""

import torch

from metaserve.workers.engine.optimizers import ADAM_BETAS, ADAM_EPS, init_optimizer_state, optimizer_step
from metaserve.workers.spec import OuterOptimizerSpec


def per_tensor_adam(lr: float, params: dict, grads: dict, state: dict) -> tuple[dict, dict]:
    """The per-tensor form (the engine's Adam until the foreach change)."""
    beta1, beta2 = ADAM_BETAS
    step = state["step"] + 1
    bias_correction1 = 1.0 - beta1 ** int(step)
    bias_correction2_sqrt = (1.0 - beta2 ** int(step)) ** 0.5
    new_params, new_state = {}, {"step": step}
    for name, value in params.items():
        grad = grads[name]
        exp_avg = state[f"exp_avg.{name}"].lerp(grad, 1.0 - beta1)
        exp_avg_sq = state[f"exp_avg_sq.{name}"] * beta2 + (1.0 - beta2) * grad * grad
        denominator = exp_avg_sq.sqrt() / bias_correction2_sqrt + ADAM_EPS
        new_params[name] = value - (lr / bias_correction1) * exp_avg / denominator
        new_state[f"exp_avg.{name}"], new_state[f"exp_avg_sq.{name}"] = exp_avg, exp_avg_sq
    return new_params, new_state


def test_foreach_adam_is_bit_identical_to_the_per_tensor_form():
    spec = OuterOptimizerSpec(name="adam", lr=0.003)
    generator = torch.Generator().manual_seed(1)
    shapes = [(40, 1), (40,), (40, 40), (1, 40), (1,), (3, 5, 7, 9)]
    params = {f"p{index}": torch.randn(shape, generator=generator) for index, shape in enumerate(shapes)}
    ours = theirs = init_optimizer_state(spec, params)
    ours_params = theirs_params = params
    for _ in range(30):  # gradients over nine orders of magnitude
        grads = {name: torch.randn(value.shape, generator=generator)
                 * 10.0 ** int(torch.randint(-6, 3, (), generator=generator)) for name, value in params.items()}
        ours_params, ours = optimizer_step(spec, ours_params, grads, ours)
        theirs_params, theirs = per_tensor_adam(spec.lr, theirs_params, grads, theirs)
    assert list(ours_params) == list(params) and ours.keys() == theirs.keys()
    for name in params:
        assert torch.equal(ours_params[name], theirs_params[name]), name
        assert not torch.equal(ours_params[name], params[name]), name
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
