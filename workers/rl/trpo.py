"""MAML-RL's TRPO outer step (Schulman et al. 2015, as in Finn et al. 2017 §5.3).

g = ∇_θ surrogate of the adapted policies, x ≈ H⁻¹g by conjugate gradient, where H is the
Hessian of the mean KL(π_θ'old ‖ π_θ'(θ)) through the inner steps; at θ_old it is Jᵀ F J
(J = ∂θ'/∂θ, F = the KL Hessian in θ', since ∇KL = 0 there), computed as a forward-mode
product through the inner step, F by double differentiation of the analytic Gaussian KL, and a
backward product (:func:`kl_hvp`); the step √(2δ / xᵀHx)·x is shrunk by ``backtrack_ratio``
until the surrogate improves and the mean KL ≤ δ = ``max_kl`` (else no step).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor
from torch.func import grad, vmap

from metaserve.workers.rl.policies import expand_params
from metaserve.workers.rl.rollouts import Trajectories
from metaserve.workers.spec import MAMLSpec, PolicyGradientSpec

Params = dict[str, Tensor]


class MetaObjective(Protocol):
    """What the TRPO step needs of MAML-RL (:class:`~metaserve.workers.rl.maml_rl.MAMLRL`)."""

    params: Params
    pg: PolicyGradientSpec
    algorithm: MAMLSpec

    def policy_outputs(self, params: Params, observations: Tensor) -> tuple[Tensor, Tensor]: ...
    def adapt(self, task_params: Params, data: Trajectories, *, create_graph: bool,
              step: int = 0) -> Params: ...
    def adapt_all(self, theta: Params, batches: list[Trajectories], *,
                  create_graph: bool = True) -> Params: ...
    def surrogate(self, adapted: Params, data: Trajectories) -> Tensor: ...
    def mean_kl(self, old: tuple[Tensor, Tensor], adapted: Params, data: Trajectories) -> Tensor: ...


def conjugate_gradient(matvec, b: Tensor, iterations: int, tolerance: float = 1e-10) -> Tensor:  # noqa: ANN001
    """x ≈ A⁻¹b for symmetric positive (semi)definite A given as ``matvec`` (Hestenes–Stiefel)."""
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    rr = residual @ residual
    for _ in range(iterations):
        if rr <= tolerance:
            break
        product = matvec(direction)
        step = rr / (direction @ product)
        x = x + step * direction
        residual = residual - step * product
        rr_next = residual @ residual
        direction = residual + (rr_next / rr) * direction
        rr = rr_next
    return x


def flatten(params: Params) -> Tensor:
    return torch.cat([value.reshape(-1) for value in params.values()])


def unflatten(vector: Tensor, like: Params) -> Params:
    out, start = {}, 0
    for name, value in like.items():
        out[name] = vector[start:start + value.numel()].view_as(value)
        start += value.numel()
    return out


def kl_hvp(maml: MetaObjective, theta: Params, batches: list[Trajectories], data: Trajectories):  # noqa: ANN201
    """v ↦ H v with H the Hessian at θ of the mean KL(π_θ'(θ_old) ‖ π_θ'(θ)) through the inner
    steps: Jᵀ F J v (exact at θ_old, see the module docstring). With ``first_order``, J = I;
    with one inner step J_t = I − α ∇²L_t(θ) is symmetric, so J v is a second backward
    product (cheaper than forward mode through the inner gradient)."""
    theta = {k: v.detach() for k, v in theta.items()}
    tasks = data.observations.shape[0]
    if maml.algorithm.first_order or not batches:
        adapted = expand_params(theta, tasks)
        push = lambda tangent: expand_params(tangent, tasks)  # noqa: E731
        pull = lambda cotangent: {k: v.sum(0) for k, v in cotangent.items()}  # noqa: E731
    elif len(batches) == 1:
        per_task = {k: v.clone() for k, v in expand_params(theta, tasks).items()}
        adapted, task_pullback = torch.func.vjp(
            lambda p: maml.adapt(p, batches[0], create_graph=True), per_task)

        def push(tangent: Params) -> Params:
            return task_pullback({k: v.clone() for k, v in expand_params(tangent, tasks).items()})[0]

        def pull(cotangent: Params) -> Params:
            return {k: v.sum(0) for k, v in task_pullback(cotangent)[0].items()}
    else:
        def inner(th: Params) -> Params:
            return maml.adapt_all(th, batches)

        adapted, pullback = torch.func.vjp(inner, theta)
        push = lambda tangent: torch.func.jvp(inner, (theta,), (tangent,))[1]  # noqa: E731
        pull = lambda cotangent: pullback(cotangent)[0]  # noqa: E731
    adapted = {k: v.detach() for k, v in adapted.items()}
    with torch.no_grad():
        old = vmap(maml.policy_outputs)(adapted, data.observations)
    kl_gradient = grad(lambda a: maml.mean_kl(old, a, data))

    def product(vector: Tensor) -> Tensor:
        pushed = push(unflatten(vector, theta))
        _, fisher = torch.func.jvp(kl_gradient, (adapted,), (pushed,))
        return flatten(pull(fisher)).detach()

    return product


def trpo_step(maml: MetaObjective, batches: list[Trajectories], post: Trajectories) -> dict[str, float]:
    """One TRPO step of θ on the surrogate of the adapted policies (see the module docstring);
    θ is updated in place when the line search accepts a candidate."""
    pg = maml.pg
    theta = {k: v.detach() for k, v in maml.params.items()}
    create_graph = not maml.algorithm.first_order
    leaf = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    adapted = expand_params(leaf, post.observations.shape[0])
    for step, batch in enumerate(batches):
        adapted = maml.adapt(adapted, batch, create_graph=create_graph, step=step)
    objective = maml.surrogate(adapted, post)
    gradient = flatten(dict(zip(leaf, torch.autograd.grad(objective, list(leaf.values())))))
    hvp = kl_hvp(maml, theta, batches, post)

    def damped(vector: Tensor) -> Tensor:
        return hvp(vector) + pg.cg_damping * vector

    direction = conjugate_gradient(damped, gradient, pg.cg_iters)
    curvature = float(direction @ damped(direction))
    metrics = {"train/surrogate_before": float(objective.detach()),  # same keys every step
               "train/surrogate_after": float(objective.detach()), "train/kl": 0.0,
               "train/line_search_steps": float(pg.line_search_steps)}
    if not curvature > 0 or not torch.isfinite(direction).all():
        return metrics
    full_step = (2 * pg.max_kl / curvature) ** 0.5 * direction
    with torch.no_grad():
        old_adapted = maml.adapt_all(theta, batches, create_graph=False) if batches \
            else expand_params(theta, post.observations.shape[0])
        old = vmap(maml.policy_outputs)(old_adapted, post.observations)
    start = flatten(theta)
    for attempt in range(pg.line_search_steps):
        candidate = unflatten(start + pg.backtrack_ratio ** attempt * full_step, theta)
        with torch.no_grad():
            adapted = maml.adapt_all(candidate, batches, create_graph=False) if batches \
                else expand_params(candidate, post.observations.shape[0])
            value = maml.surrogate(adapted, post)
            kl = maml.mean_kl(old, adapted, post)
        if torch.isfinite(value) and value > objective and kl <= pg.max_kl:
            with torch.no_grad():
                for name, parameter in maml.params.items():
                    parameter.copy_(candidate[name])
            metrics.update({"train/surrogate_after": float(value), "train/kl": float(kl),
                            "train/line_search_steps": float(attempt)})
            break
    return metrics
