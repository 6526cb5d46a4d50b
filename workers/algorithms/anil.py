"""ANIL (Raghu et al. 2020, "Rapid Learning or Feature Reuse? Towards Understanding the
Effectiveness of MAML"): only the head adapts in the inner loop; the body is meta-learned
but shared across tasks, so a task's features are computed once, not once per inner step."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, vmap

from metaserve.workers.algorithms.base import Algorithm, Fast, accuracy
from metaserve.workers.networks import Params


class ANIL(Algorithm):
    name = "anil"

    def __init__(self, spec, model, *, classification: bool, fast_path: bool = True):
        super().__init__(spec, model, classification=classification, fast_path=fast_path)
        self._head_grad = grad(self._head_loss)
        self._batched_objective = self._chunk_objective

    @property
    def differentiates_norm_twice(self) -> bool:
        return False  # the inner loop differentiates the head only; the body's norms once, by the outer backward

    def initial_fast(self, params: Params) -> Fast:
        return {name: params[name] for name in self.model.head_names}

    def predict(self, params: Params, fast: Fast, x: Tensor, stats_rows: int | None = None) -> Tensor:
        return self.model.head(fast, self.model.features(params, x, stats_rows=stats_rows))

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
              first_order: bool = False) -> Fast:
        return self.adapt_head(params, self.model.features(params, support_x), support_y, steps, first_order)

    def adapt_head(self, params: Params, features: Tensor, support_y: Tensor, steps: int,
                   first_order: bool = False) -> Fast:
        """``steps`` inner steps of the head on the support set's ``features``."""
        fast = self.initial_fast(params)
        for _ in range(steps):
            grads = self._head_grad(fast, features, support_y)
            if first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            fast = self.inner_update(params, fast, grads)
        return fast

    def _head_loss(self, fast: Fast, features: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self.model.head(fast, features), y)

    def _chunk_objective(self, params: Params, support_x: Tensor, support_y: Tensor,
                         query_x: Tensor, query_y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """As :meth:`Algorithm.task_objective` for a chunk of tasks, with the body's features of
        every image computed once (:meth:`chunk_features`) and reused by the "before" metrics;
        the head adapts per task."""
        support, (query,) = self.chunk_features(params, support_x, query_x, (self.trains_transductive,))
        return vmap(self._objective_of_features, in_dims=(None, 0, 0, 0, 0))(
            params, support, support_y, query, query_y)

    def _objective_of_features(self, params: Params, support: Tensor, support_y: Tensor, query: Tensor,
                               query_y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        fast = self.adapt_head(params, support, support_y, self.inner_steps, self.first_order)
        output = self.model.head(fast, query)
        loss = self.loss_fn(output, query_y)
        metrics = {"loss_after": loss.detach()}
        if self.classification:  # the order of the plain path's metrics (Algorithm.meta_gradient)
            metrics["accuracy_after"] = accuracy(output.detach(), query_y)
        before = self.model.head({name: value.detach() for name, value in self.initial_fast(params).items()},
                                 query.detach())
        metrics["loss_before"] = self.loss_fn(before, query_y)
        if self.classification:
            metrics["accuracy_before"] = accuracy(before, query_y)
        return loss, metrics

    def _curve(self, served_steps: tuple[int, ...], transductive_steps: tuple[int, ...]):  # noqa: ANN202
        """The evaluation passes with the body's features computed once per chunk (the
        query's once per pass), and the head adapted once per task for both passes."""
        last = max(served_steps + transductive_steps)
        passes = self._passes(served_steps, transductive_steps)

        def task_curve(params: Params, support: Tensor, support_y: Tensor, queries: tuple[Tensor, ...],
                       query_y: Tensor) -> tuple[tuple[Tensor, Tensor], ...]:
            fast = self.initial_fast(params)
            curves: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in passes]
            for step in range(last + 1):
                for (_, steps), query, (losses, accuracies) in zip(passes, queries, curves):
                    if step in steps:
                        output = self.model.head(fast, query)
                        losses.append(self.loss_fn(output, query_y))
                        accuracies.append(accuracy(output, query_y) if self.classification else losses[-1])
                if step < last:
                    fast = self.inner_update(params, fast, self._head_grad(fast, support, support_y))
            return tuple((torch.stack(losses), torch.stack(accuracies)) for losses, accuracies in curves)

        def chunk_curve(params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                        query_y: Tensor) -> tuple[tuple[Tensor, Tensor], ...]:
            support, queries = self.chunk_features(params, support_x, query_x, tuple(mode for mode, _ in passes))
            return vmap(task_curve, in_dims=(None, 0, 0, 0, 0))(params, support, support_y, tuple(queries), query_y)

        return chunk_curve

    def recipe(self) -> dict:
        return {**super().recipe(), "adapts": "head", "head": list(self.model.head_names),
                "first_order": self.first_order}
