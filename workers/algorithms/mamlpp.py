"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML"), the parts that learn the
inner optimizer and shape the outer objective:

- **LSLR**, learned per-layer per-step inner learning rates: every parameter tensor (a layer's
  weight and its bias each) has one learned rate per inner step, ``α[p, k]``;
  θ_{k+1}[p] = θ_k[p] − α[p, k] · ∇_p L_support(θ_k). The rates are meta-parameters named
  ``lslr.<param>`` (shape ``[inner_steps]``), initialized to ``spec.inner_lr`` and part of the
  artifact, so a served ``adapt`` steps with them; a step past the trained ``inner_steps`` (an
  evaluation at 10 steps of a 5-step model) uses the last step's rate.
- **The multi-step loss** (MSL): for the first ``multi_step_loss_iterations`` meta-iterations
  the objective is Σ_k w_k · L_query(θ_k) over the steps k = 1..K, the weights starting equal
  and annealed toward the last step exactly as the authors' code does
  (``get_per_step_loss_importance_vector``: non-final weights fall linearly by
  1/(K·N) per iteration to a floor of 0.03/K, the last weight takes up the rest); afterwards
  the final step's query loss alone.
- **Derivative-order annealing** (DA): first-order inner gradients for the first
  ``first_order_iterations`` meta-iterations, then second order.

Left out (the paper's other items): per-step batch-norm weights and running statistics (BNWB,
BNRS; the models here normalize with a set's statistics, no running ones) and the cosine
annealing of the outer learning rate (an outer-optimizer matter, not the algorithm's).

The iteration that the MSL and DA schedules read is set by the trainer before each meta-step
(:meth:`begin_iteration`); the schedule is a pure function of it, so a resumed job continues
the same schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaserve.workers.algorithms.base import Algorithm, Fast, accuracy
from metaserve.workers.networks import Params

LSLR_PREFIX = "lslr."
MIN_NON_FINAL_WEIGHT = 0.03  # divided by K, as in the authors' code


def per_step_loss_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float]:
    """The multi-step loss's weights of the query losses after steps 1..``steps`` at
    ``iteration``; after ``anneal_iterations`` the last step's loss alone ([0, …, 0, 1])."""
    if steps < 1:
        raise ValueError("the multi-step loss needs at least one inner step")
    if iteration >= anneal_iterations:
        return [0.0] * (steps - 1) + [1.0]
    weights = [1.0 / steps] * steps
    decay = 1.0 / steps / anneal_iterations
    floor = MIN_NON_FINAL_WEIGHT / steps
    for index in range(steps - 1):
        weights[index] = max(weights[index] - iteration * decay, floor)
    weights[-1] = min(weights[-1] + iteration * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


class MAMLPlusPlus(Algorithm):
    name = "mamlpp"

    def __init__(self, spec, model, *, classification: bool, fast_path: bool = True):
        super().__init__(spec, model, classification=classification, fast_path=fast_path)
        self.multi_step_loss_iterations = int(spec.multi_step_loss_iterations)
        self.first_order_iterations = int(spec.first_order_iterations)
        self.iteration = 0

    def begin_iteration(self, iteration: int) -> None:
        """The meta-iteration whose meta-gradient is computed next (MSL and DA schedules)."""
        self.iteration = int(iteration)

    # ----------------------------------------------------------------- parameters

    def init_params(self, generator: torch.Generator) -> Params:
        params = self.model.init_params(generator)
        steps = max(self.inner_steps, 1)
        rates = {LSLR_PREFIX + name: torch.full((steps,), self.inner_lr, dtype=value.dtype)
                 for name, value in params.items()}
        return {**params, **rates}

    def model_params(self, params: Params) -> Params:
        return {name: value for name, value in params.items() if not name.startswith(LSLR_PREFIX)}

    def initial_fast(self, params: Params) -> Fast:
        return self.model_params(params)

    def step_lr(self, params: Params, name: str, step: int) -> Tensor:
        rates = params[LSLR_PREFIX + name]
        return rates[min(step, rates.shape[0] - 1)]

    def inner_update_at(self, params: Params, fast: Fast, grads: Fast, step: int) -> Fast:
        return {name: value - self.step_lr(params, name, step) * grads[name] for name, value in fast.items()}

    def inner_update(self, params: Params, fast: Fast, grads: Fast) -> Fast:
        raise TypeError("MAML++'s inner update depends on the step: use inner_update_at")

    # ----------------------------------------------------------------- schedules

    @property
    def current_first_order(self) -> bool:
        return self.first_order or self.iteration < self.first_order_iterations

    def current_loss_weights(self) -> list[float]:
        return per_step_loss_weights(self.inner_steps, self.iteration, self.multi_step_loss_iterations)

    # ----------------------------------------------------------------- one task

    def _step(self, params: Params, fast: Fast, support_x: Tensor, support_y: Tensor, step: int,
              first_order: bool) -> Fast:
        grads = self._support_grad(fast, params, support_x, support_y)
        if first_order:
            grads = {name: g.detach() for name, g in grads.items()}
        return self.inner_update_at(params, fast, grads, step)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
              first_order: bool = False) -> Fast:
        fast = self.initial_fast(params)
        for step in range(steps):
            fast = self._step(params, fast, support_x, support_y, step, first_order)
        return fast

    def task_objective(self, params: Params, support_x: Tensor, support_y: Tensor,
                       query_x: Tensor, query_y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Σ_k w_k · query loss after step k (the multi-step loss; the last step's alone once
        annealed), and the metrics of the last step."""
        weights = self.current_loss_weights()
        first_order = self.current_first_order
        fast = self.initial_fast(params)
        objective = None
        for step in range(self.inner_steps):
            fast = self._step(params, fast, support_x, support_y, step, first_order)
            if step < self.inner_steps - 1 and weights[step] == 0.0:
                continue
            output = self.query_predict(params, fast, support_x, query_x, self.trains_transductive)
            loss = self.loss_fn(output, query_y)
            objective = weights[step] * loss if objective is None else objective + weights[step] * loss
        metrics = {"loss_after": loss.detach()}
        if self.classification:
            metrics["accuracy_after"] = accuracy(output.detach(), query_y)
        return objective, metrics

    # ----------------------------------------------------------------- evaluation

    def _evaluation_step(self, params: Params, fast: Params, support_x: Tensor, support_y: Tensor,
                         step: int) -> Params:
        return self._step(params, fast, support_x, support_y, step, first_order=False)

    def recipe(self) -> dict:
        recipe = super().recipe()
        del recipe["inner_lr"]
        return {**recipe, "learned_lrs": "per_layer_per_step", "lr_prefix": LSLR_PREFIX,
                "first_order": self.first_order,
                "multi_step_loss_iterations": self.multi_step_loss_iterations,
                "first_order_iterations": self.first_order_iterations}
