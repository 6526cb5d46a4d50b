"""``resmlp``: a residual MLP (He et al. 2016's identity shortcuts on fully connected layers).

``x → tanh(W_in x) → blocks × [h + W_2 act(W_1 h)] → head``. The shortcuts keep a deeper network
trainable by the few inner-loop steps of MAML: with ``W_2`` starting small, each block starts
near the identity.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt
from torch import Tensor

from metaserve.workers.networks import FunctionalModel, Params
from metaserve.workers.spec_base import StrictModel

ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu}
RESIDUAL_INIT_SCALE = 0.1
"""The second layer of each block starts at this fraction of the default bound."""


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound


class ResidualMLPSpec(StrictModel):
    """Residual MLP: an input layer, ``blocks`` residual blocks of two layers of ``width``
    units, and a linear head; the output size comes from the task family."""

    name: Literal["resmlp"] = "resmlp"
    width: StrictInt = Field(40, ge=1, le=4096, description="Units of every hidden layer.")
    blocks: StrictInt = Field(2, ge=0, le=16, description="Residual blocks.")
    activation: Literal["relu", "tanh", "gelu"] = Field("relu", description="Inside the blocks.")


class ResidualMLP(FunctionalModel):
    """The functional ``resmlp`` (parameters in a dict, pure ``features``/``head``)."""

    Spec = ResidualMLPSpec

    def __init__(self, spec: ResidualMLPSpec, input_shape: tuple[int, ...], output_dim: int,
                 prompt_dim: int = 0):
        self.spec = spec
        self.input_shape = tuple(input_shape)
        self.output_dim = output_dim
        self.prompt_dim = prompt_dim
        self.in_features = math.prod(self.input_shape)
        self.activation = ACTIVATIONS[spec.activation]

    def init_params(self, generator: torch.Generator) -> Params:
        width, fan_in = self.spec.width, self.in_features + self.prompt_dim
        bound = 1.0 / math.sqrt(fan_in)
        params: Params = {"input.weight": _uniform((width, fan_in), bound, generator),
                          "input.bias": _uniform((width,), bound, generator)}
        bound = 1.0 / math.sqrt(width)
        for block in range(self.spec.blocks):
            params[f"blocks.{block}.0.weight"] = _uniform((width, width), bound, generator)
            params[f"blocks.{block}.0.bias"] = _uniform((width,), bound, generator)
            params[f"blocks.{block}.1.weight"] = _uniform((width, width),
                                                          bound * RESIDUAL_INIT_SCALE, generator)
            params[f"blocks.{block}.1.bias"] = torch.zeros(width)
        params["head.weight"] = _uniform((self.output_dim, width), bound, generator)
        params["head.bias"] = _uniform((self.output_dim,), bound, generator)
        return params

    def features(self, params: Params, x: Tensor, prompt: Tensor | None = None,
                 stats_rows: int | None = None) -> Tensor:
        h = x.reshape(x.shape[0], self.in_features)
        if prompt is not None:  # CAVIA's context: concatenated to every input
            h = torch.cat([h, prompt.expand(h.shape[0], prompt.shape[-1])], dim=1)
        h = torch.tanh(F.linear(h, params["input.weight"], params["input.bias"]))
        for block in range(self.spec.blocks):
            inner = self.activation(F.linear(h, params[f"blocks.{block}.0.weight"],
                                             params[f"blocks.{block}.0.bias"]))
            h = h + F.linear(inner, params[f"blocks.{block}.1.weight"],
                             params[f"blocks.{block}.1.bias"])
        return h

    def describe(self) -> dict:
        return {"name": "resmlp", "width": self.spec.width, "blocks": self.spec.blocks,
                "activation": self.spec.activation, "input_shape": list(self.input_shape),
                "output_dim": self.output_dim, "prompt_dim": self.prompt_dim}
