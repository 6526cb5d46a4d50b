"""Reptile (Nichol et al. 2018, "On First-Order Meta-Learning Algorithms"):
θ ← θ + ε · mean over tasks of (θ_task − θ), θ_task after ``inner_steps`` SGD steps on the
task's support set. The engine hands the outer optimizer the pseudo-gradient
Σ_tasks (θ − θ_task) (divided by the meta-batch size when applied); with
``outer_optimizer: {name: sgd, lr: ε}`` that is exactly the paper's update."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vmap

from metaserve.workers.algorithms.base import _TASK_AXES, Algorithm, accuracy
from metaserve.workers.networks import Params


class Reptile(Algorithm):
    name = "reptile"

    def __init__(self, spec, model, *, classification: bool, fast_path: bool = True):
        super().__init__(spec, model, classification=classification, fast_path=fast_path)
        self._batched_adapt_and_measure = vmap(self._adapt_and_measure, in_dims=_TASK_AXES)

    def _adapt_and_measure(self, params: Params, support_x: Tensor, support_y: Tensor,
                           query_x: Tensor, query_y: Tensor):
        fast = self.adapt(params, support_x, support_y, self.inner_steps)
        output = self.query_predict(params, fast, support_x, query_x, self.trains_transductive)
        metrics = {"loss_after": self.loss_fn(output, query_y)}
        if self.classification:
            metrics["accuracy_after"] = accuracy(output, query_y)
        return fast, metrics

    def meta_gradient(self, params: Params, support_x: Tensor, support_y: Tensor,
                      query_x: Tensor, query_y: Tensor) -> tuple[Params, dict[str, Tensor]]:
        if self.fast_path is not None:
            return self.fast_path.reptile_step(params, support_x, support_y, query_x, query_y)
        detached = {name: value.detach() for name, value in params.items()}
        fast, metrics = self._batched_adapt_and_measure(detached, support_x, support_y, query_x, query_y)
        pseudo_gradient = {name: (detached[name][None] - fast[name]).sum(0) for name in detached}
        with torch.no_grad():
            metrics.update(self._batched_query_metrics(detached, support_x, support_y, query_x, query_y))
        return pseudo_gradient, metrics
