"""ANIL (Raghu et al. 2020, "Rapid Learning or Feature Reuse? Towards Understanding the
Effectiveness of MAML"): only the head adapts in the inner loop; the body is meta-learned
but shared across tasks, so a task's features are computed once, not once per inner step."""

from __future__ import annotations

from torch import Tensor
from torch.func import grad

from metaserve.workers.algorithms.base import Algorithm, Fast
from metaserve.workers.networks import Params


class ANIL(Algorithm):
    name = "anil"

    def __init__(self, spec, model, *, classification: bool, fast_path: bool = True):
        super().__init__(spec, model, classification=classification, fast_path=fast_path)
        self._head_grad = grad(self._head_loss)

    def initial_fast(self, params: Params) -> Fast:
        return {name: params[name] for name in self.model.head_names}

    def predict(self, params: Params, fast: Fast, x: Tensor, stats_rows: int | None = None) -> Tensor:
        return self.model.head(fast, self.model.features(params, x, stats_rows=stats_rows))

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
              first_order: bool = False) -> Fast:
        features = self.model.features(params, support_x)
        fast = self.initial_fast(params)
        for _ in range(steps):
            grads = self._head_grad(fast, features, support_y)
            if first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            fast = self.inner_update(params, fast, grads)
        return fast

    def _head_loss(self, fast: Fast, features: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self.model.head(fast, features), y)


    def recipe(self) -> dict:
        return {**super().recipe(), "adapts": "head", "head": list(self.model.head_names),
                "first_order": self.first_order}
