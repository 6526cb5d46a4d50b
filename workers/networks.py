"""Functional models: a parameter dict plus pure functions of ``(params, x)``.

Models see one task's examples ``x`` of shape ``[N, *input_shape]``; the engine adds the
task axis with ``torch.func.vmap``. Nothing here holds state, so the same parameters can be
adapted per task without copies (the torch.func MAML recipe).

- ``mlp``: fully connected, hidden sizes and activation from the spec.
- ``conv4``: the standard few-shot backbone (Vinyals et al. 2016; Finn et al. 2017):
  4 × [conv 3×3 → norm → ReLU → max-pool 2] and a linear head. The activation is applied after
  the max-pool: a monotonic activation commutes with a max, so the values and gradients are
  the same bits (ties go to the same element), with the activation on a quarter of the values
  (a ReLU and max-pool forward and backward 27 % faster; docs/notes/fewshot-profile.md).
- ``resnet12``: the backbone of MetaOptNet and TADAM (Lee et al. 2019; Oreshkin et al. 2018):
  4 residual blocks of 3 × [conv 3×3 → norm → leaky ReLU 0.1] with a 1×1 conv shortcut, each
  followed by max-pool 2, widths 64-160-320-640 (or smaller, for a CPU), global average
  pooling and a linear head.

Normalization (``norm``) of the convolutional models:

- ``batch``: statistics of the batch being normalized, per task, no running statistics, as in
  MAML's reference code. Transductive: a query image's output depends on the other query
  images. Kept for training as in the paper; evaluation reports both numbers, and the served
  predictor normalizes with the support set's statistics instead.
- ``support``: statistics of the task's support set, for support and query alike (in
  training too), so nothing depends on the query batch.
- ``instance``: each example's own per-channel statistics over (H, W) (the instance part of
  TaskNorm-I, Bronskill et al. 2020); ``layer``: each example over (C, H, W); ``none``.

``stats_rows`` (an int) says that the first ``stats_rows`` examples of ``x`` are the support set
whose statistics ``batch``/``support`` norms use for every row; ``None`` uses all of ``x``.

Prompt conditioning (for the ``prompt`` algorithm, CAVIA, Zintgraf et al. 2019): the
per-task prompt vector ``[P]`` is concatenated to every input — as ``P`` extra features for
the MLP, and as ``P`` extra constant input channels for conv4 (channel concatenation).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # not at run time: a plugin imports this module while the spec module loads it
    from metaserve.workers.spec import Conv4Spec, JobSpec, MLPSpec, ResNet12Spec

Params = dict[str, Tensor]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
}
NORM_EPS = 1e-5
HEAD_NAMES = ("head.weight", "head.bias")


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound


def _linear_init(out_features: int, in_features: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``nn.Linear``'s default initialization (Kaiming-uniform with a = √5), seeded."""
    bound = 1.0 / math.sqrt(in_features)
    return (_uniform((out_features, in_features), bound, generator),
            _uniform((out_features,), bound, generator))


class FunctionalModel:
    """A model as pure functions of a parameter dict.

    ``features(params, x, prompt)`` is the body, ``head(params, h)`` the last linear layer
    (whose parameters are :data:`HEAD_NAMES`, the part ANIL adapts).
    """

    input_shape: tuple[int, ...]
    output_dim: int
    prompt_dim: int
    head_names: tuple[str, ...] = HEAD_NAMES
    norm_mode: str = "none"
    """``batch`` and ``support`` read a set's statistics (see the module docstring)."""
    interleaves_tasks: bool = False
    """Whether :meth:`features` computes several tasks at once under :func:`interleaved_tasks`
    (true of the built-in models; a plugin's features run per task under ``vmap``)."""

    def init_params(self, generator: torch.Generator) -> Params:
        raise NotImplementedError

    def features(self, params: Params, x: Tensor, prompt: Tensor | None = None,
                 stats_rows: int | None = None) -> Tensor:
        raise NotImplementedError

    def head(self, params: Params, h: Tensor) -> Tensor:
        return F.linear(h, params["head.weight"], params["head.bias"])

    def __call__(self, params: Params, x: Tensor, prompt: Tensor | None = None,
                 stats_rows: int | None = None) -> Tensor:
        return self.head(params, self.features(params, x, prompt, stats_rows))

    def describe(self) -> dict:
        """The architecture, as recorded in ``meta_init.json``."""
        raise NotImplementedError


class MLP(FunctionalModel):
    """``in → hidden… → out`` with the given activation; the prompt is concatenated to x."""

    interleaves_tasks = True

    def __init__(self, spec: MLPSpec, input_shape: tuple[int, ...], output_dim: int, prompt_dim: int = 0):
        self.spec = spec
        self.input_shape = tuple(input_shape)
        self.output_dim = output_dim
        self.prompt_dim = prompt_dim
        self.activation = ACTIVATIONS[spec.activation]
        self.in_features = math.prod(self.input_shape)
        self.num_hidden = len(spec.hidden)
        self.feature_dim = spec.hidden[-1] if spec.hidden else self.in_features + prompt_dim

    def init_params(self, generator: torch.Generator) -> Params:
        params: Params = {}
        fan_in = self.in_features + self.prompt_dim
        for index, width in enumerate(self.spec.hidden):
            params[f"layers.{index}.weight"], params[f"layers.{index}.bias"] = _linear_init(width, fan_in, generator)
            fan_in = width
        params["head.weight"], params["head.bias"] = _linear_init(self.output_dim, fan_in, generator)
        return params

    def features(self, params: Params, x: Tensor, prompt: Tensor | None = None,
                 stats_rows: int | None = None) -> Tensor:
        h = x.reshape(x.shape[0], self.in_features)
        if prompt is not None:
            h = torch.cat([h, prompt.expand(h.shape[0], prompt.shape[-1])], dim=1)
        for index in range(self.num_hidden):
            h = self.activation(F.linear(h, params[f"layers.{index}.weight"], params[f"layers.{index}.bias"]))
        return h

    def describe(self) -> dict:
        return {"name": "mlp", "hidden": list(self.spec.hidden), "activation": self.spec.activation,
                "input_shape": list(self.input_shape), "output_dim": self.output_dim,
                "prompt_dim": self.prompt_dim}


_FUSED_BATCH_NORM: ContextVar[bool] = ContextVar("fused_batch_norm", default=False)


@contextmanager
def fused_batch_norm(enabled: bool = True) -> Iterator[None]:
    """Within this context a ``batch``/``support`` norm over a whole set (``stats_rows`` None)
    runs as torch's fused kernel (``F.batch_norm``, training mode, no running statistics): one
    pass each way instead of the written-out form's six, the same maths up to float rounding;
    with the support set's statistics (``stats_rows``), one ``addcmul`` with a per-channel
    scale and shift instead of four full-size operations.

    Only for computations that differentiate the norm at most once (a first-order meta-step,
    ProtoNets, ANIL's body, evaluation, serving): under ``vmap`` torch's batch rule of the fused
    kernel's *double* backward gives a wrong input gradient of the weight's gradient (torch
    2.13; docs/notes/fewshot-profile.md), so a second-order inner loop through the norm keeps
    the written-out form, which is the default outside this context."""
    token = _FUSED_BATCH_NORM.set(enabled)
    try:
        yield
    finally:
        _FUSED_BATCH_NORM.reset(token)


_INTERLEAVED_TASKS: ContextVar[int] = ContextVar("interleaved_tasks", default=1)


@contextmanager
def interleaved_tasks(tasks: int) -> Iterator[None]:
    """Within this context (and :func:`fused_batch_norm`'s) a built-in model's ``x`` holds
    ``tasks`` tasks' examples interleaved, row ``n · tasks + t`` being example ``n`` of task
    ``t``, and a ``batch``/``support`` norm keeps each task's statistics apart — without
    ``vmap``. Each task's channel is then one channel of ``x`` viewed as ``[N, tasks · C, H, W]``
    (a view, no copy), so torch's fused kernel normalizes all tasks at once with the affine
    inside it, where ``vmap``'s batch rule of the same kernel copies the activations into that
    layout and back and applies the affine as two more full-size operations (≈ 25 % of a
    ProtoNets step; docs/notes/fewshot-profile.md). ``stats_rows`` counts rows of ``x``: the
    first ``stats_rows // tasks`` examples of every task. Per-example norms are unaffected."""
    token = _INTERLEAVED_TASKS.set(tasks)
    try:
        yield
    finally:
        _INTERLEAVED_TASKS.reset(token)


def _interleaved_batch_norm(x: Tensor, weight: Tensor, bias: Tensor, stats_rows: int | None,
                            tasks: int) -> Tensor:
    rows, channels = x.shape[0] // tasks, x.shape[1]
    if stats_rows is None:
        return F.batch_norm(x.view(rows, tasks * channels, *x.shape[2:]), None, None,
                            weight.repeat(tasks), bias.repeat(tasks), training=True,
                            eps=NORM_EPS).view_as(x)
    per_task = x.view(rows, tasks, channels, *x.shape[2:])
    var, mean = torch.var_mean(per_task[:stats_rows // tasks], dim=(0, 3, 4), unbiased=False, keepdim=True)
    scale = torch.rsqrt(var + NORM_EPS) * weight[:, None, None]
    return torch.addcmul(bias[:, None, None] - mean * scale, per_task, scale).view_as(x)


def _batch_norm(x: Tensor, weight: Tensor, bias: Tensor, stats_rows: int | None = None) -> Tensor:
    """Batch norm with the statistics of ``x[:stats_rows]`` (one task's support set) or of
    ``x`` itself (one task's batch), no running statistics."""
    if _FUSED_BATCH_NORM.get():
        tasks = _INTERLEAVED_TASKS.get()
        if tasks > 1:
            return _interleaved_batch_norm(x, weight, bias, stats_rows, tasks)
        if stats_rows is None:
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=NORM_EPS)
        # the support set's statistics for every row: one fused multiply-add over x
        var, mean = torch.var_mean(x[:stats_rows], dim=(0, 2, 3), unbiased=False, keepdim=True)
        scale = torch.rsqrt(var + NORM_EPS) * weight[:, None, None]
        return torch.addcmul(bias[:, None, None] - mean * scale, x, scale)
    if _INTERLEAVED_TASKS.get() > 1:
        raise RuntimeError("interleaved tasks are normalized by the fused kernel only")
    reference = x if stats_rows is None else x[:stats_rows]
    mean = reference.mean(dim=(0, 2, 3), keepdim=True)
    var = reference.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + NORM_EPS) * weight[:, None, None] + bias[:, None, None]


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, stats_rows: int | None = None) -> Tensor:
    """Per-example normalization over (C, H, W) with a per-channel affine."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + NORM_EPS) * weight[:, None, None] + bias[:, None, None]


def _instance_norm(x: Tensor, weight: Tensor, bias: Tensor, stats_rows: int | None = None) -> Tensor:
    """Per-example, per-channel normalization over (H, W) with a per-channel affine."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + NORM_EPS) * weight[:, None, None] + bias[:, None, None]


def conv3x3(h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """3×3 convolution, padding 1. A forward without autograd whose weight differs per task
    (``vmap`` over adapted weights: evaluation's query forwards in MAML-like algorithms) and
    whose input has few channels (an image's first layer) is an ``unfold`` and one batched
    matrix product: ``vmap``'s rule turns the convolution into a grouped one with one input
    channel per group, a slow case of the kernel (28 % of FOMAML's evaluation, 30 % slower
    than the product; the same values here, to float rounding in general)."""
    if (torch.is_grad_enabled() or weight.shape[1] > 4
            or not torch._C._functorch.is_batchedtensor(weight)):  # noqa: SLF001
        return F.conv2d(h, weight, bias, padding=1)
    out = torch.matmul(weight.reshape(weight.shape[0], -1), F.unfold(h, 3, padding=1))
    if bias is not None:
        out = out + bias[:, None]
    return out.view(h.shape[0], weight.shape[0], h.shape[2], h.shape[3])


def max_pool2(h: Tensor) -> Tensor:
    """2×2 max-pool, stride 2 (an odd last row or column dropped, as ``F.max_pool2d``). Without
    autograd (evaluation's and serving's forwards run under ``torch.no_grad``) it is the
    elementwise max of the window's four strided views: the same values, ≈ 4× faster than
    the pooling kernel, which also computes the argmax indices only a backward needs. With
    autograd, ``F.max_pool2d`` (its gradient goes to the first maximum of a window; the views'
    ``torch.maximum`` would split ties, and blank image borders tie)."""
    if torch.is_grad_enabled():
        return F.max_pool2d(h, 2)
    height, width = h.shape[-2] // 2 * 2, h.shape[-1] // 2 * 2
    return torch.maximum(torch.maximum(h[..., 0:height:2, 0:width:2], h[..., 1:height:2, 0:width:2]),
                         torch.maximum(h[..., 0:height:2, 1:width:2], h[..., 1:height:2, 1:width:2]))


NORMS: dict[str, Callable | None] = {"batch": _batch_norm, "support": _batch_norm,
                                     "instance": _instance_norm, "layer": _layer_norm,
                                     "none": None}


class Conv4(FunctionalModel):
    """4 × [conv 3×3 (padding 1) → norm → ReLU → max-pool 2] → flatten → linear head."""

    interleaves_tasks = True

    BLOCKS = 4

    def __init__(self, spec: Conv4Spec, input_shape: tuple[int, ...], output_dim: int, prompt_dim: int = 0):
        if len(input_shape) != 3:
            raise ValueError(f"conv4 needs (C, H, W) inputs, got input_shape {tuple(input_shape)}")
        self.spec = spec
        self.input_shape = tuple(input_shape)
        self.output_dim = output_dim
        self.prompt_dim = prompt_dim
        channels, height, width = self.input_shape
        for _ in range(self.BLOCKS):
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"conv4 needs images of at least 16×16, got {self.input_shape[1:]}")
        self.feature_dim = spec.filters * height * width
        self.norm = NORMS[spec.norm]
        self.norm_mode = spec.norm

    def init_params(self, generator: torch.Generator) -> Params:
        params: Params = {}
        in_channels = self.input_shape[0] + self.prompt_dim
        for index in range(self.BLOCKS):
            fan_in = in_channels * 9
            bound = 1.0 / math.sqrt(fan_in)
            params[f"blocks.{index}.conv.weight"] = _uniform((self.spec.filters, in_channels, 3, 3), bound, generator)
            params[f"blocks.{index}.conv.bias"] = _uniform((self.spec.filters,), bound, generator)
            if self.norm is not None:
                params[f"blocks.{index}.norm.weight"] = torch.ones(self.spec.filters)
                params[f"blocks.{index}.norm.bias"] = torch.zeros(self.spec.filters)
            in_channels = self.spec.filters
        params["head.weight"], params["head.bias"] = _linear_init(self.output_dim, self.feature_dim, generator)
        return params

    def features(self, params: Params, x: Tensor, prompt: Tensor | None = None,
                 stats_rows: int | None = None) -> Tensor:
        h = _with_prompt(x, prompt)
        # a per-channel bias before a set- or instance-statistics norm is subtracted again by
        # it: a forward without autograd skips adding it (the same maths; a full-size add less
        # per layer under vmap). With autograd it stays, so training's gradients are unchanged.
        skip_bias = not torch.is_grad_enabled() and self.norm_mode in ("batch", "support", "instance")
        for index in range(self.BLOCKS):
            h = conv3x3(h, params[f"blocks.{index}.conv.weight"],
                        None if skip_bias else params[f"blocks.{index}.conv.bias"])
            if self.norm is not None:
                h = self.norm(h, params[f"blocks.{index}.norm.weight"], params[f"blocks.{index}.norm.bias"],
                              stats_rows)
            h = F.relu(max_pool2(h))  # = max-pool(ReLU(h)) bit for bit, on 4× fewer values
        return h.flatten(1)

    def describe(self) -> dict:
        return {"name": "conv4", "filters": self.spec.filters, "norm": self.spec.norm,
                "input_shape": list(self.input_shape), "output_dim": self.output_dim,
                "prompt_dim": self.prompt_dim}


def _with_prompt(x: Tensor, prompt: Tensor | None) -> Tensor:
    """``x`` with the prompt as extra constant input channels (CAVIA's concatenation)."""
    if prompt is None:
        return x
    return torch.cat([x, prompt[None, :, None, None].expand(x.shape[0], -1, x.shape[2], x.shape[3])],
                     dim=1)


class ResNet12(FunctionalModel):
    """ResNet-12 (Lee et al. 2019, MetaOptNet; Oreshkin et al. 2018, TADAM): 4 residual blocks,
    each 3 × [conv 3×3 (no bias) → norm → leaky ReLU 0.1] (no activation after the third
    norm: it comes after the residual sum) plus a 1×1 conv → norm shortcut, then max-pool 2;
    global average pooling and a linear head. Without DropBlock."""

    interleaves_tasks = True

    BLOCKS = 4
    CONVS = 3
    SLOPE = 0.1

    def __init__(self, spec: ResNet12Spec, input_shape: tuple[int, ...], output_dim: int,
                 prompt_dim: int = 0):
        if len(input_shape) != 3:
            raise ValueError(f"resnet12 needs (C, H, W) inputs, got input_shape {tuple(input_shape)}")
        if min(input_shape[1:]) < 2 ** self.BLOCKS:
            raise ValueError(f"resnet12 needs images of at least 16×16, got {tuple(input_shape[1:])}")
        self.spec = spec
        self.input_shape = tuple(input_shape)
        self.output_dim = output_dim
        self.prompt_dim = prompt_dim
        self.widths = list(spec.widths)
        self.feature_dim = self.widths[-1]
        self.norm = NORMS[spec.norm]
        self.norm_mode = spec.norm

    def _norm_params(self, params: Params, prefix: str, channels: int) -> None:
        if self.norm is not None:
            params[f"{prefix}.weight"] = torch.ones(channels)
            params[f"{prefix}.bias"] = torch.zeros(channels)

    def init_params(self, generator: torch.Generator) -> Params:
        params: Params = {}
        in_channels = self.input_shape[0] + self.prompt_dim
        for block, width in enumerate(self.widths):
            channels = in_channels
            for conv in range(self.CONVS):
                bound = 1.0 / math.sqrt(channels * 9)
                params[f"blocks.{block}.conv{conv}.weight"] = _uniform((width, channels, 3, 3), bound, generator)
                self._norm_params(params, f"blocks.{block}.norm{conv}", width)
                channels = width
            bound = 1.0 / math.sqrt(in_channels)
            params[f"blocks.{block}.shortcut.weight"] = _uniform((width, in_channels, 1, 1), bound, generator)
            self._norm_params(params, f"blocks.{block}.shortcut_norm", width)
            in_channels = width
        params["head.weight"], params["head.bias"] = _linear_init(self.output_dim, self.feature_dim, generator)
        return params

    def _normalize(self, params: Params, prefix: str, h: Tensor, stats_rows: int | None) -> Tensor:
        if self.norm is None:
            return h
        return self.norm(h, params[f"{prefix}.weight"], params[f"{prefix}.bias"], stats_rows)

    def features(self, params: Params, x: Tensor, prompt: Tensor | None = None,
                 stats_rows: int | None = None) -> Tensor:
        h = _with_prompt(x, prompt)
        for block in range(len(self.widths)):
            shortcut = self._normalize(params, f"blocks.{block}.shortcut_norm",
                                       F.conv2d(h, params[f"blocks.{block}.shortcut.weight"]), stats_rows)
            out = h
            for conv in range(self.CONVS):
                out = conv3x3(out, params[f"blocks.{block}.conv{conv}.weight"])
                out = self._normalize(params, f"blocks.{block}.norm{conv}", out, stats_rows)
                if conv < self.CONVS - 1:
                    out = F.leaky_relu(out, self.SLOPE)
            h = F.leaky_relu(max_pool2(out + shortcut), self.SLOPE)  # commute: monotonic
        return h.mean(dim=(2, 3))

    def describe(self) -> dict:
        return {"name": "resnet12", "widths": list(self.widths), "norm": self.spec.norm,
                "input_shape": list(self.input_shape), "output_dim": self.output_dim,
                "prompt_dim": self.prompt_dim}


def build_model(spec: MLPSpec | Conv4Spec | ResNet12Spec, input_shape: tuple[int, ...],
                output_dim: int, prompt_dim: int = 0) -> FunctionalModel:
    """The functional model named by ``spec``, sized for the task family: a built-in, or an
    installed plugin's (:data:`metaserve.workers.spec.PLUGINS`)."""
    from metaserve.workers.spec import PLUGINS

    plugin = PLUGINS.models.get(spec.name)
    if plugin is not None:
        return plugin.implementation(spec, tuple(input_shape), output_dim, prompt_dim)
    if spec.name == "mlp":
        return MLP(spec, input_shape, output_dim, prompt_dim)
    if spec.name == "conv4":
        return Conv4(spec, input_shape, output_dim, prompt_dim)
    if spec.name == "resnet12":
        return ResNet12(spec, input_shape, output_dim, prompt_dim)
    raise ValueError(f"unknown model {spec.name!r}")


def network_of(spec: JobSpec) -> tuple[MLPSpec | Conv4Spec, tuple[int, ...], int, int]:
    """What :func:`build_model` takes for the supervised job ``spec``: the network's spec,
    sized for the task family's examples and outputs (and, for prompt tuning, its prompt)."""
    family = spec.task_family
    prompt_dim = spec.algorithm.prompt_dim if spec.algorithm.name == "prompt" else 0
    return spec.model, tuple(family.input_shape), int(family.output_dim), prompt_dim


def model_for(spec: JobSpec) -> FunctionalModel:
    """The network of the supervised job ``spec``."""
    return build_model(*network_of(spec))
