"""Prototypical Networks (Snell et al. 2017, "Prototypical Networks for Few-shot Learning"):
the network is an embedding f; a task is adapted by averaging the embeddings of each class's
support images into a prototype, and a query image is classified by softmax over the negative
squared Euclidean distances of its embedding to the prototypes. No gradient step adapts
anything: the meta-gradient flows through the prototypes into f.

The adapted state (``fast``) is the prototypes ``[ways, D]``; the served predictor is the
nearest prototype (logits = −‖f(x) − c_k‖²). The model's linear head is not used."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

from metaserve.workers.algorithms.base import Algorithm, Fast, accuracy
from metaserve.workers.networks import Params


class ProtoNet(Algorithm):
    name = "protonet"

    def __init__(self, spec, model, *, classification: bool, fast_path: bool = True):
        if not classification:
            raise ValueError("protonet classifies: it needs an image (classification) task family")
        super().__init__(spec, model, classification=classification, fast_path=fast_path)
        self.ways = model.output_dim
        self._batched_objective = self._chunk_objective

    @property
    def differentiates_norm_twice(self) -> bool:
        return False  # no inner gradient at all

    def initial_fast(self, params: Params) -> Fast:
        """No support set seen: every prototype at the origin (every class equally likely)."""
        reference = next(iter(params.values()))
        return torch.zeros(self.ways, self.model.feature_dim, dtype=reference.dtype,
                           device=reference.device)

    def prototypes(self, features: Tensor, support_y: Tensor) -> Fast:
        """Mean support embedding per class (a class without support images keeps its
        prototype at the origin)."""
        one_hot = F.one_hot(support_y, self.ways).to(features.dtype)  # [S, ways]
        counts = one_hot.sum(0).clamp(min=1.0)
        return (one_hot.T @ features) / counts[:, None]

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
              first_order: bool = False) -> Fast:
        """The class prototypes of the support set."""
        return self.prototypes(self.model.features(params, support_x), support_y)

    @staticmethod
    def logits(features: Tensor, prototypes: Tensor) -> Tensor:
        return -((features[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)

    def predict(self, params: Params, fast: Fast, x: Tensor, stats_rows: int | None = None) -> Tensor:
        return self.logits(self.model.features(params, x, stats_rows=stats_rows), fast)

    def _chunk_objective(self, params: Params, support_x: Tensor, support_y: Tensor,
                         query_x: Tensor, query_y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-task query losses and metrics of a chunk: the features of every image at once
        (:meth:`chunk_features`), then prototypes and logits per task; the metrics "before"
        adaptation (every prototype at the origin: equal logits) in closed form."""
        support, (query,) = self.chunk_features(params, support_x, query_x, (self.trains_transductive,))
        return vmap(self._objective_of_features)(support, support_y, query, query_y)

    def _objective_of_features(self, support: Tensor, support_y: Tensor, query: Tensor,
                               query_y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        output = self.logits(query, self.prototypes(support, support_y))
        loss = self.loss_fn(output, query_y)
        uniform = torch.zeros_like(output.detach())  # equal logits: the "before" prediction
        return loss, {"loss_after": loss.detach(), "accuracy_after": accuracy(output.detach(), query_y),
                      "loss_before": self.loss_fn(uniform, query_y),
                      "accuracy_before": accuracy(uniform, query_y)}

    def _curve(self, served_steps: tuple[int, ...], transductive_steps: tuple[int, ...]):  # noqa: ANN202
        """No inner steps: every step count of a pass is the nearest-prototype result."""

        def task_curve(steps: tuple[int, ...], support: Tensor, support_y: Tensor, query: Tensor,
                       query_y: Tensor) -> tuple[Tensor, Tensor]:
            output = self.logits(query, self.prototypes(support, support_y))
            loss, hits = self.loss_fn(output, query_y), accuracy(output, query_y)
            return loss.expand(len(steps)), hits.expand(len(steps))

        def chunk_curve(params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                        query_y: Tensor) -> tuple[tuple[Tensor, Tensor], ...]:
            passes = self._passes(served_steps, transductive_steps)
            support, queries = self.chunk_features(params, support_x, query_x, tuple(mode for mode, _ in passes))
            return tuple(vmap(partial(task_curve, steps))(support, support_y, query, query_y)
                         for (_, steps), query in zip(passes, queries))

        return chunk_curve

    def recipe(self) -> dict:
        recipe = {"algorithm": "protonet", "inner_steps": 0, "adapts": "prototypes",
                  "distance": "squared_euclidean", "served_predictor": "nearest_prototype"}
        if self.model.norm_mode in ("batch", "support"):
            recipe["served_normalization"] = "support_statistics"
        return recipe
