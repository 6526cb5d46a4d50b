"""MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks"): θ is trained so that ``inner_steps`` SGD steps on a task's support set give a
low query loss; the meta-gradient flows through the inner steps (second order) unless
``first_order`` is set (FOMAML, same paper, §5.2)."""

from __future__ import annotations

from metaserve.workers.algorithms.base import Algorithm


class MAML(Algorithm):
    name = "maml"

    def recipe(self) -> dict:
        return {**super().recipe(), "first_order": self.first_order}
