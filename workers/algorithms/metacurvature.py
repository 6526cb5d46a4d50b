"""Meta-Curvature (Park & Oliva 2019, "Meta-Curvature"): the inner gradient of every parameter
is transformed by a learned Kronecker-factored matrix before the step,
θ' = θ − α · MC(∇L_support(θ)), the factors meta-learned with θ (second order by default).

For a parameter of shape ``(out, in, kh, kw)`` (a convolution) the transform is the paper's
tensor product: G'[o, i, f] = Σ M_out[o, a] · G[a, j, g] · M_in[j, i] · M_f[g, f] over the
flattened kernel f = kh·kw; for a linear weight ``(out, in)`` it is M_out · G · M_in; for a
vector (a bias, a norm's affine) a full matrix M · g. Every factor starts as the identity, so
the first meta-iteration is MAML's. The factors are meta-parameters named
``curvature.<param>.{out,in,filter}`` and part of the artifact (a served ``adapt`` applies
them). Cost: per step, two or three small matrix products per parameter tensor beside the
network's own; parameters: Σ out² + in² (+ (kh·kw)²) — for conv4 with 64 filters on 28 px,
about 50 k beside its 113 k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaserve.workers.algorithms.base import Algorithm, Fast
from metaserve.workers.networks import Params

CURVATURE_PREFIX = "curvature."


def curvature_factors(name: str, value: Tensor) -> dict[str, Tensor]:
    """Identity factors of the transform of the parameter ``name`` (shape of ``value``)."""
    def eye(size: int) -> Tensor:
        return torch.eye(size, dtype=value.dtype)

    prefix = CURVATURE_PREFIX + name
    if value.dim() == 1:
        return {f"{prefix}.out": eye(value.shape[0])}
    if value.dim() == 2:
        return {f"{prefix}.out": eye(value.shape[0]), f"{prefix}.in": eye(value.shape[1])}
    if value.dim() == 4:
        return {f"{prefix}.out": eye(value.shape[0]), f"{prefix}.in": eye(value.shape[1]),
                f"{prefix}.filter": eye(value.shape[2] * value.shape[3])}
    raise ValueError(f"meta-curvature has no transform for {name!r} of shape {tuple(value.shape)}")


def transform(params: Params, name: str, grad: Tensor) -> Tensor:
    """MC(``grad``) for the parameter ``name`` with the factors in ``params``."""
    prefix = CURVATURE_PREFIX + name
    m_out = params[f"{prefix}.out"]
    if grad.dim() == 1:
        return m_out @ grad
    if grad.dim() == 2:
        return m_out @ grad @ params[f"{prefix}.in"]
    out_channels, in_channels, height, width = grad.shape
    flat = grad.reshape(out_channels, in_channels, height * width)
    result = torch.einsum("oa,ajg,ji,gf->oif", m_out, flat, params[f"{prefix}.in"], params[f"{prefix}.filter"])
    return result.reshape(out_channels, in_channels, height, width)


class MetaCurvature(Algorithm):
    name = "metacurvature"

    def init_params(self, generator: torch.Generator) -> Params:
        params = self.model.init_params(generator)
        factors: Params = {}
        for name, value in params.items():
            factors.update(curvature_factors(name, value))
        return {**params, **factors}

    def model_params(self, params: Params) -> Params:
        return {name: value for name, value in params.items() if not name.startswith(CURVATURE_PREFIX)}

    def initial_fast(self, params: Params) -> Fast:
        return self.model_params(params)

    def inner_update(self, params: Params, fast: Fast, grads: Fast) -> Fast:
        return {name: value - self.inner_lr * transform(params, name, grads[name])
                for name, value in fast.items()}

    def recipe(self) -> dict:
        return {**super().recipe(), "preconditioner": "kronecker", "curvature_prefix": CURVATURE_PREFIX,
                "first_order": self.first_order}
