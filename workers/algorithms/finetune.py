"""The pooled baseline that meta-learning has to beat: one model trained on every training
task's rows together (no inner loop), then fine-tuned per task on its support set.

This is the "pretrained" baseline of MAML's regression experiments (Finn et al. 2017, §5.1:
"pretraining on all of the tasks ... and then, at test-time, fine-tuning with gradient
descent on the K provided points"), the Baseline of Chen et al. 2019 ("A Closer Look at
Few-shot Classification"), and the finding of Tian et al. 2020 ("Rethinking Few-Shot Image
Classification: a Good Embedding Is All You Need?") that such a pooled model is often as
good as a meta-learned one. It runs through the same engine, API and artifacts as MAML, so
the two are compared on the same network, tasks, budget and fine-tuning recipe:

- training: the plain loss of θ on the support *and* query rows of each sampled task (the
  tasks' rows pooled), summed over the meta-batch and averaged by the engine; with one task
  per batch and Adam this is ordinary Adam training on the tasks' rows;
- adaptation (evaluation, ``adapt``, ``POST /v1/jobs/{id}/adapt``): ``inner_steps`` plain SGD
  steps at ``inner_lr`` on all parameters from θ, exactly the evaluation MAML gets.

Training reports ``loss_pooled`` (the objective) and ``loss_before`` (the query rows, not
adapted); there is no ``loss_after`` during training, because computing it would cost
``inner_steps`` extra gradient steps per task per iteration for a number the validation
evaluation (``val/loss_step{k}``) already reports.

With image families, whose tasks relabel their classes 0..ways-1 at random, the pooled head
cannot learn a fixed label map (Chen et al.'s Baseline has one global label space); the
pooled training then shapes the features only, and the fine-tuning steps fit the head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaserve.workers.algorithms.base import Algorithm, accuracy
from metaserve.workers.networks import Params


class Finetune(Algorithm):
    name = "finetune"

    def task_objective(self, params: Params, support_x: Tensor, support_y: Tensor,
                       query_x: Tensor, query_y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The pooled model's plain loss on all of one task's rows (support and query), and its
        metrics (detached). The base class's meta-gradient differentiates this, vmapped over
        the tasks: a model with set statistics (batch norm) normalizes each task's rows on
        their own, as in every other algorithm's training."""
        rows_x = torch.cat([support_x, query_x])
        rows_y = torch.cat([support_y, query_y])
        output = self.predict(params, self.initial_fast(params), rows_x)
        loss = self.loss_fn(output, rows_y)
        metrics = {"loss_pooled": loss.detach()}
        if self.classification:
            metrics["accuracy_pooled"] = accuracy(output.detach(), rows_y)
        return loss, metrics

    def recipe(self) -> dict:
        return {**super().recipe(), "pretraining": "pooled"}
