"""The batched-linear fast path of the meta-step for MLP models.

The vmapped step (:meth:`Algorithm.meta_gradient`) is overhead-bound on small networks: a
sine MAML iteration is a few MFLOP, and its time goes to ``torch.func``'s per-op batching
rules, pytree handling and a long autograd graph of small ops (profile in
``docs/notes/engine-throughput-and-sine.md``). Here the same maths is written over an explicit
task axis ``T``:

- a layer is one ``F.linear`` over all tasks' rows while its weights are still the shared θ
  (one GEMM), and one ``torch.baddbmm`` once the inner loop has made them per task
  (``[T, out, in]``);
- the inner loop's gradient is written out (each layer's backward as matrix products, the
  activation's derivative by the aten function autograd itself uses), so it needs no
  ``torch.autograd.grad`` call and no per-task copies of θ; second order, the meta-gradient is
  one reverse pass of autograd through forward, inner backward and update.

The algorithm's own ``initial_fast`` and ``inner_update`` are used (they broadcast a shared
parameter against a per-task gradient), so MAML, FOMAML, Meta-SGD, ANIL (only the head adapts:
the body's output is computed once) and Reptile share this code. Results equal the vmapped
path's up to float rounding (tests: meta-gradients within 1e-6, parameters after 100
iterations within 1e-6). :func:`batched_path` says whether it applies; where it does not
(convolutional models, the prompt algorithm, a switched-off spec) the vmapped path runs.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from metaserve.workers.networks import HEAD_NAMES, MLP, FunctionalModel, Params


class FastPathAlgorithm(Protocol):
    """What the fast path uses of an algorithm. :class:`~metaserve.workers.algorithms.base.Algorithm`
    satisfies it; named here so that this module, which base.py imports, does not import it
    back."""

    name: str
    model: FunctionalModel
    classification: bool
    first_order: bool
    inner_steps: int

    def model_params(self, params: Params) -> Params: ...

    def initial_fast(self, params: Params) -> Any: ...

    def inner_update(self, params: Params, fast: Any, grads: Any) -> Any: ...

# d activation: (grad of the output, pre-activation z, output h) -> grad of z; the aten
# functions autograd's own backward nodes call (so second order differentiates them the same)
_ACTIVATION_BACKWARD = {
    "relu": lambda grad, z, h: torch.ops.aten.threshold_backward(grad, h, 0),
    "tanh": lambda grad, z, h: torch.ops.aten.tanh_backward(grad, h),
    "gelu": lambda grad, z, h: torch.ops.aten.gelu_backward(grad, z),
}
ALGORITHMS = ("maml", "metasgd", "anil", "reptile")


def batched_path(algorithm: FastPathAlgorithm) -> "BatchedLinearPath | None":
    """The fast path for ``algorithm``, or None where it does not apply."""
    model = algorithm.model
    if (algorithm.name not in ALGORITHMS or not isinstance(model, MLP) or model.prompt_dim
            or model.spec.activation not in _ACTIVATION_BACKWARD):
        return None
    return BatchedLinearPath(algorithm)


def _linear(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``h [T, N, in]`` through a layer shared by all tasks (``[out, in]``) or per task
    (``[T, out, in]``)."""
    if weight.dim() == 2:
        return F.linear(h, weight, bias)
    return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


class BatchedLinearPath:
    """The meta-gradient (and Reptile's adaptation) of ``algorithm`` over an MLP, batched by
    hand over the tasks of a chunk (see the module docstring)."""

    def __init__(self, algorithm: FastPathAlgorithm):
        self.algorithm = algorithm
        model: MLP = algorithm.model
        self.layers = [(f"layers.{i}.weight", f"layers.{i}.bias") for i in range(model.num_hidden)]
        self.layers.append(HEAD_NAMES)
        self.activation = model.activation
        self.activation_backward = _ACTIVATION_BACKWARD[model.spec.activation]
        self.in_features = model.in_features
        adapted = set(algorithm.initial_fast({name: torch.empty(0) for pair in self.layers for name in pair}))
        # the inner loop runs from the first layer it adapts; the layers below it are computed once
        self.first_adapted = min(i for i, pair in enumerate(self.layers) if adapted & set(pair))
        self.classification = algorithm.classification

    # ----------------------------------------------------------------- the network, batched

    def _forward(self, weights: Params, h: Tensor, start: int) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
        """Layers ``start..`` on ``h``; the output and, per layer, (input, z, activation output)."""
        cache = []
        last = len(self.layers) - 1
        for index in range(start, last + 1):
            weight_name, bias_name = self.layers[index]
            z = _linear(h, weights[weight_name], weights[bias_name])
            out = z if index == last else self.activation(z)
            cache.append((h, z, out))
            h = out
        return h, cache

    def _backward(self, weights: Params, cache: list, grad_out: Tensor, start: int) -> Params:
        """Per-task gradients ``[T, ...]`` of the layers ``start..`` from the output's gradient."""
        grads: Params = {}
        grad = grad_out
        last = len(self.layers) - 1
        for index in range(last, start - 1, -1):
            weight_name, bias_name = self.layers[index]
            h_in, z, out = cache[index - start]
            if index != last:
                grad = self.activation_backward(grad, z, out)
            grads[weight_name] = torch.bmm(grad.transpose(1, 2), h_in)
            grads[bias_name] = grad.sum(1)
            if index > start:
                weight = weights[weight_name]
                grad = torch.bmm(grad, weight) if weight.dim() == 3 else grad.matmul(weight)
        return grads

    def _loss(self, output: Tensor, target: Tensor, with_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Per-task loss ``[T]`` and (``with_grad``) its gradient with respect to ``output``."""
        if self.classification:
            tasks, rows, classes = output.shape
            losses = F.cross_entropy(output.reshape(tasks * rows, classes), target.reshape(-1),
                                     reduction="none").view(tasks, rows).mean(1)
            if not with_grad:
                return losses, None
            return losses, (output.softmax(-1) - F.one_hot(target, classes).to(output.dtype)) / rows
        difference = output - target
        losses = (difference ** 2).mean(dim=tuple(range(1, difference.dim())))
        if not with_grad:
            return losses, None
        return losses, difference * (2.0 / difference[0].numel())

    def _inputs(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.in_features)

    def _below(self, params: Params, x: Tensor) -> Tensor:
        h = self._inputs(x)
        for index in range(self.first_adapted):
            weight_name, bias_name = self.layers[index]
            h = self.activation(_linear(h, params[weight_name], params[bias_name]))
        return h

    # ----------------------------------------------------------------- adaptation

    def _inner_step(self, params: Params, fast: Params, h: Tensor, support_y: Tensor,
                    first_order: bool) -> Params:
        """One inner step of every task from ``h``, the input of the first adapted layer."""
        algorithm = self.algorithm
        weights = {**algorithm.model_params(params), **fast}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not first_order):
            output, cache = self._forward(weights, h, self.first_adapted)
            _, grad_out = self._loss(output, support_y, with_grad=True)
            grads = self._backward(weights, cache, grad_out, self.first_adapted)
        return algorithm.inner_update(params, fast, {name: grads[name] for name in fast})

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
              first_order: bool) -> Params:
        """``steps`` inner steps on every task's support set at once: the adapted parameters,
        ``[T, ...]`` (or shared, after 0 steps). Differentiable in ``params`` unless
        ``first_order`` (then the inner gradients are constants, as FOMAML's)."""
        fast = self.algorithm.initial_fast(params)
        h = self._below(self.algorithm.model_params(params), support_x)
        for _ in range(steps):
            fast = self._inner_step(params, fast, h, support_y, first_order)
        return fast

    def _predict(self, params: Params, fast: Params, x: Tensor) -> Tensor:
        model_params = self.algorithm.model_params(params)
        output, _ = self._forward({**model_params, **fast}, self._below(model_params, x), self.first_adapted)
        return output

    def _metrics(self, output: Tensor, target: Tensor, losses: Tensor, suffix: str) -> dict[str, Tensor]:
        metrics = {f"loss_{suffix}": losses.detach()}
        if self.classification:
            metrics[f"accuracy_{suffix}"] = (output.detach().argmax(-1) == target).to(output.dtype).mean(1)
        return metrics

    def _before(self, params: Params, query_x: Tensor, query_y: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            output = self._predict(params, self.algorithm.initial_fast(params), query_x)
            losses, _ = self._loss(output, query_y, with_grad=False)
            return self._metrics(output, query_y, losses, "before")

    # ----------------------------------------------------------------- a chunk of tasks

    def meta_gradient(self, params: Params, support_x: Tensor, support_y: Tensor,
                      query_x: Tensor, query_y: Tensor) -> tuple[Params, dict[str, Tensor]]:
        """As :meth:`Algorithm.meta_gradient`: the sum over the chunk's tasks of the per-task
        meta-gradients, and per-task metrics ``[T]``."""
        algorithm = self.algorithm
        leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
        with torch.enable_grad():
            fast = self.adapt(leaves, support_x, support_y, algorithm.inner_steps, algorithm.first_order)
            output = self._predict(leaves, fast, query_x)
            losses, _ = self._loss(output, query_y, with_grad=False)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
        grads = {name: torch.zeros_like(leaves[name]) if g is None else g for name, g in zip(leaves, grads)}
        metrics = self._metrics(output, query_y, losses, "after")
        metrics.update(self._before(params, query_x, query_y))
        return grads, metrics

    def reptile_step(self, params: Params, support_x: Tensor, support_y: Tensor,
                     query_x: Tensor, query_y: Tensor) -> tuple[Params, dict[str, Tensor]]:
        """Reptile's pseudo-gradient Σ_tasks (θ − θ_task) and per-task metrics ``[T]``."""
        algorithm = self.algorithm
        with torch.no_grad():
            detached = {name: value.detach() for name, value in params.items()}
            fast = self.adapt(detached, support_x, support_y, algorithm.inner_steps, first_order=False)
            output = self._predict(detached, fast, query_x)
            losses, _ = self._loss(output, query_y, with_grad=False)
            tasks = support_x.shape[0]
            pseudo_gradient = {name: (value[None] - fast[name].expand(tasks, *value.shape)).sum(0)
                               for name, value in detached.items()}
        metrics = self._metrics(output, query_y, losses, "after")
        metrics.update(self._before(detached, query_x, query_y))
        return pseudo_gradient, metrics

    def evaluation_curves(self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          query_y: Tensor, steps: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """As :meth:`Algorithm.evaluation_curves`: per-task query loss and accuracy (regression:
        the loss again) ``[T, len(steps)]`` after each step count in ``steps`` (sorted)."""
        algorithm = self.algorithm
        with torch.no_grad():
            model_params = algorithm.model_params(params)
            support_h, query_h = self._below(model_params, support_x), self._below(model_params, query_x)
            fast = algorithm.initial_fast(params)
            losses, accuracies = [], []
            for step in range(max(steps) + 1):
                if step in steps:
                    output, _ = self._forward({**model_params, **fast}, query_h, self.first_adapted)
                    loss, _ = self._loss(output, query_y, with_grad=False)
                    losses.append(loss)
                    accuracies.append(self._metrics(output, query_y, loss, "")["accuracy_"]
                                      if self.classification else loss)
                if step < max(steps):
                    fast = self._inner_step(params, fast, support_h, support_y, first_order=True)
            return torch.stack(losses, dim=1), torch.stack(accuracies, dim=1)
