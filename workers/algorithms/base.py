"""The interface every meta-learning algorithm implements, and the shared vectorized pieces.

An algorithm is three small pure functions of the meta-parameters ``params`` (a dict that
holds the model's parameters and, for Meta-SGD, the learned inner learning rates):

- ``initial_fast(params)``: the per-task state that the inner loop adapts (all model
  parameters for MAML, the head for ANIL, a zero prompt for prompt tuning);
- ``predict(params, fast, x)``: the model's output for one task's inputs;
- ``inner_update(params, fast, grads)``: one inner-loop step.

From those, :class:`Algorithm` builds the per-task objective (query loss after
``inner_steps`` steps on the support set, inner gradients by ``torch.func.grad``), the
meta-gradient of a chunk of tasks — the gradient of the sum over tasks of the
``vmap``-ped objective, which is the sum of the per-task meta-gradients — and the evaluation
curves. The outer gradient is taken by reverse-mode autograd through the ``vmap``-ped
objective rather than by an outer ``torch.func.grad``: the result is bit-identical and one
transform level less makes a sine MAML step about 25 % faster (benchmarks/engine_throughput.py). Second order is the default: the
inner gradients stay in the graph; ``first_order`` detaches them (FOMAML, Finn et al. 2017).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from metaserve.workers.algorithms.batched import batched_path
from metaserve.workers.networks import FunctionalModel, Params, fused_batch_norm, interleaved_tasks

Fast = Any  # a pytree of tensors: the per-task adapted state


def mse_loss(prediction: Tensor, target: Tensor) -> Tensor:
    # written out: cheaper than F.mse_loss under vmap + grad (fewer decomposed ops)
    return ((prediction - target) ** 2).mean()


def cross_entropy_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target)


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == target).to(logits.dtype).mean()


_TASK_AXES = (None, 0, 0, 0, 0)


class Algorithm:
    """Base class; subclasses override :meth:`initial_fast`, :meth:`predict`,
    :meth:`inner_update` (and :meth:`init_params` when they add meta-parameters)."""

    name: str = ""
    # the fused batch-norm kernel where the norm is differentiated once at most (see
    # ``differentiates_norm_twice``); False runs the written-out norm everywhere (a yardstick's
    # "before" path)
    fused_norm: bool = True

    def __init__(self, spec, model: FunctionalModel, *, classification: bool, fast_path: bool = True):
        self.spec = spec
        self.model = model
        self.classification = classification
        self.loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy_loss if classification else mse_loss
        self.inner_lr = float(spec.inner_lr)
        self.inner_steps = int(spec.inner_steps)
        self.first_order = bool(getattr(spec, "first_order", False))
        # the transformed functions are built once, not per call
        self._batched_objective = vmap(self.task_objective, in_dims=_TASK_AXES)
        self._support_grad = grad(self._support_loss)
        self._batched_query_metrics = vmap(self._query_metrics_before, in_dims=_TASK_AXES)
        self._batched_curves: dict[tuple[tuple[int, ...], tuple[int, ...]], Callable] = {}
        # the hand-batched meta-step where it applies (MLP models), else None: the vmapped one
        self.fast_path = batched_path(self) if fast_path else None

    # ----------------------------------------------------------------- to override

    def init_params(self, generator: torch.Generator) -> Params:
        """Fresh meta-parameters."""
        return self.model.init_params(generator)

    def model_params(self, params: Params) -> Params:
        """The model's parameters within ``params`` (without learned lrs)."""
        return params

    def initial_fast(self, params: Params) -> Fast:
        return dict(params)

    def predict(self, params: Params, fast: Fast, x: Tensor, stats_rows: int | None = None) -> Tensor:
        return self.model(fast, x, stats_rows=stats_rows)

    def inner_update(self, params: Params, fast: Fast, grads: Fast) -> Fast:
        return {name: value - self.inner_lr * grads[name] for name, value in fast.items()}

    # ----------------------------------------------------------------- one task

    def query_predict(self, params: Params, fast: Fast, support_x: Tensor, x: Tensor,
                      transductive: bool = False) -> Tensor:
        """Outputs for the query inputs ``x`` of a task whose support set is ``support_x``.

        A model whose norm reads a set's statistics (``batch``, ``support``) normalizes with
        the support set's, so each output depends on ``x``'s row and the support set only —
        unless ``transductive`` (``batch`` norm in training and in the second evaluation
        number, as in MAML's paper), when the statistics are ``x``'s own."""
        if not self._reads_support_statistics(transductive):
            return self.predict(params, fast, x)
        rows = support_x.shape[0]
        return self.predict(params, fast, torch.cat([support_x, x]), stats_rows=rows)[rows:]

    def _reads_support_statistics(self, transductive: bool) -> bool:
        """Whether the query's outputs are normalized with the support set's statistics."""
        return self.model.norm_mode in ("batch", "support") and not (
            transductive and self.model.norm_mode == "batch")

    def interleaves(self) -> bool:
        """Whether :meth:`chunk_features` runs without ``vmap``: a built-in model, and the
        fused norm on (the algorithm differentiates the norms once at most)."""
        return self.fused_norm and self.model.interleaves_tasks and not self.differentiates_norm_twice

    def chunk_features(self, params: Params, support_x: Tensor, query_x: Tensor,
                       modes: tuple[bool, ...]) -> tuple[Tensor, list[Tensor]]:
        """The body's features of a chunk of tasks (``[T, N, ...]`` in, ``[T, N, D]`` out) as
        :meth:`adapt` and :meth:`query_predict` compute them: the support set's alone (the same
        in every mode, computed once), and the query's for each of ``modes`` (transductive or
        not) — alone, or where the norm reads the support set's statistics, beside the support
        set and then sliced. One forward of every image of the chunk (:func:`interleaved_tasks`)
        where :meth:`interleaves`, else per task under ``vmap``. Call it inside
        :func:`fused_batch_norm`."""
        tasks, rows = support_x.shape[0], support_x.shape[1]

        def forward(x: Tensor, stats_rows: int | None = None) -> Tensor:
            if not self.interleaves():
                return vmap(lambda one: self.model.features(params, one, stats_rows=stats_rows))(x)
            count = x.shape[1]  # [T, N, ...] → rows n·T + t
            flat = x.transpose(0, 1).reshape(count * tasks, *x.shape[2:])
            with interleaved_tasks(tasks):
                features = self.model.features(params, flat,
                                               stats_rows=None if stats_rows is None else stats_rows * tasks)
            return features.view(count, tasks, -1).transpose(0, 1)

        queries = [forward(torch.cat([support_x, query_x], dim=1), stats_rows=rows)[:, rows:]
                   if self._reads_support_statistics(mode) else forward(query_x) for mode in modes]
        return forward(support_x), queries

    @staticmethod
    def _passes(served_steps: tuple[int, ...], transductive_steps: tuple[int, ...]) -> list[tuple[bool, tuple[int, ...]]]:
        """The evaluation's non-empty passes, ``(transductive, step counts)``, served first."""
        return [(mode, steps) for mode, steps in ((False, served_steps), (True, transductive_steps)) if steps]

    @property
    def differentiates_norm_twice(self) -> bool:
        """Whether the meta-gradient differentiates the network's norms twice (an inner
        gradient through them kept in the graph): then the written-out batch norm runs, else
        the fused kernel (:func:`~metaserve.workers.networks.fused_batch_norm`)."""
        return self.inner_steps > 0 and not self.first_order

    @property
    def trains_transductive(self) -> bool:
        """Batch norm trains on the query batch's own statistics (MAML's reference code)."""
        return self.model.norm_mode == "batch"

    def _support_loss(self, fast: Fast, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self.predict(params, fast, x), y)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
              first_order: bool = False) -> Fast:
        """``steps`` inner-loop steps on one task's support set (pure; returns the new fast state)."""
        fast = self.initial_fast(params)
        for _ in range(steps):
            grads = self._support_grad(fast, params, support_x, support_y)
            if first_order:
                grads = {name: g.detach() for name, g in grads.items()} if isinstance(grads, dict) else grads.detach()
            fast = self.inner_update(params, fast, grads)
        return fast

    def task_objective(self, params: Params, support_x: Tensor, support_y: Tensor,
                       query_x: Tensor, query_y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Query loss of one task after adaptation, and its metrics (detached)."""
        fast = self.adapt(params, support_x, support_y, self.inner_steps, self.first_order)
        output = self.query_predict(params, fast, support_x, query_x, self.trains_transductive)
        loss = self.loss_fn(output, query_y)
        metrics = {"loss_after": loss.detach()}
        if self.classification:
            metrics["accuracy_after"] = accuracy(output.detach(), query_y)
        return loss, metrics

    def _query_metrics_before(self, params: Params, support_x: Tensor, support_y: Tensor,
                              query_x: Tensor, query_y: Tensor) -> dict[str, Tensor]:
        output = self.query_predict(params, self.initial_fast(params), support_x, query_x,
                                    self.trains_transductive)
        metrics = {"loss_before": self.loss_fn(output, query_y)}
        if self.classification:
            metrics["accuracy_before"] = accuracy(output, query_y)
        return metrics

    # ----------------------------------------------------------------- a chunk of tasks

    def meta_gradient(self, params: Params, support_x: Tensor, support_y: Tensor,
                      query_x: Tensor, query_y: Tensor) -> tuple[Params, dict[str, Tensor]]:
        """Sum over the chunk's tasks of the per-task meta-gradients, and per-task metrics ``[T]``
        (by the batched fast path where it applies: same maths, see :mod:`.batched`)."""
        if self.fast_path is not None:
            return self.fast_path.meta_gradient(params, support_x, support_y, query_x, query_y)
        leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
        with torch.enable_grad(), fused_batch_norm(self.fused_norm and not self.differentiates_norm_twice):
            losses, metrics = self._batched_objective(leaves, support_x, support_y, query_x, query_y)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
        grads = {name: torch.zeros_like(leaves[name]) if g is None else g
                 for name, g in zip(leaves, grads)}
        if "loss_before" not in metrics:  # ProtoNets and ANIL compute them in the objective
            with torch.no_grad(), fused_batch_norm(self.fused_norm):
                metrics.update(self._batched_query_metrics(params, support_x, support_y, query_x, query_y))
        return grads, metrics

    # ----------------------------------------------------------------- evaluation

    def _evaluation_step(self, params: Params, fast: Params, support_x: Tensor, support_y: Tensor,
                         step: int) -> Params:
        """Inner step ``step`` (from 0) of the evaluation curve; an algorithm whose inner
        update depends on the step (MAML++'s per-step rates) overrides it."""
        return self.inner_update(params, fast, self._support_grad(fast, params, support_x, support_y))

    def _curve(self, served_steps: tuple[int, ...], transductive_steps: tuple[int, ...]) -> Callable:
        """The vmapped evaluation of a chunk: per task, one adaptation, and the query loss and
        accuracy served (``served_steps``) and transductive (``transductive_steps``) after
        those step counts; one ``(loss [S], accuracy [S])`` pair per non-empty pass."""
        last = max(served_steps + transductive_steps)
        passes = self._passes(served_steps, transductive_steps)

        def task_curve(params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                       query_y: Tensor) -> tuple[tuple[Tensor, Tensor], ...]:
            fast = self.initial_fast(params)
            curves: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in passes]
            for step in range(last + 1):
                for (mode, steps), (losses, accuracies) in zip(passes, curves):
                    if step in steps:
                        output = self.query_predict(params, fast, support_x, query_x, mode)
                        losses.append(self.loss_fn(output, query_y))
                        accuracies.append(accuracy(output, query_y) if self.classification else losses[-1])
                if step < last:
                    fast = self._evaluation_step(params, fast, support_x, support_y, step)
            return tuple((torch.stack(losses), torch.stack(accuracies)) for losses, accuracies in curves)

        return vmap(task_curve, in_dims=_TASK_AXES)

    def evaluation_passes(self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          query_y: Tensor, served_steps: tuple[int, ...],
                          transductive_steps: tuple[int, ...] = ()) -> tuple[tuple[Tensor, Tensor], ...]:
        """Per-task query loss and accuracy ``[T, len(steps)]`` (accuracy equals loss for
        regression) of each non-empty pass: as the served predictor computes them (query images
        one at a time) after each step count in ``served_steps``, then with ``transductive``
        batch norm over the query batch after each in ``transductive_steps`` — from one
        adaptation per task (the support set's inner steps do not depend on the pass).
        Parameters are detached: no meta-gradient."""
        served_steps = tuple(sorted(set(served_steps)))
        transductive_steps = tuple(sorted(set(transductive_steps)))
        if self.fast_path is not None:  # an MLP: no norm, so nothing is transductive
            if transductive_steps:
                raise ValueError("a model without a norm has no transductive pass")
            return (self.fast_path.evaluation_curves(params, support_x, support_y, query_x, query_y,
                                                     served_steps),)
        key = (served_steps, transductive_steps)
        if key not in self._batched_curves:
            self._batched_curves[key] = self._curve(served_steps, transductive_steps)
        detached = {name: value.detach() for name, value in params.items()}
        # no meta-gradient: the norm is differentiated once at most (by the inner steps'
        # torch.func.grad, which turns autograd back on inside; the query forwards run without)
        with fused_batch_norm(self.fused_norm), torch.no_grad():
            return self._batched_curves[key](detached, support_x, support_y, query_x, query_y)

    def evaluation_curves(self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          query_y: Tensor, steps: tuple[int, ...],
                          transductive: bool = False) -> tuple[Tensor, Tensor]:
        """One pass of :meth:`evaluation_passes`: served, or ``transductive``."""
        served, transductive_steps = ((), steps) if transductive else (steps, ())
        return self.evaluation_passes(params, support_x, support_y, query_x, query_y, served,
                                      transductive_steps)[0]

    def export_params(self, params: Params) -> Params:
        """What goes into ``meta_init.safetensors``."""
        return dict(params)

    def recipe(self) -> dict:
        """The adaptation recipe recorded in ``meta_init.json``; for a model that normalizes
        with a set's statistics, which set the served predictor uses (the support set's)."""
        recipe = {"algorithm": self.name, "inner_lr": self.inner_lr,
                  "inner_steps": self.inner_steps, "adapts": "all"}
        if self.model.norm_mode in ("batch", "support"):
            recipe["served_normalization"] = "support_statistics"
        return recipe
