"""MAML with a policy-gradient inner loop (Finn et al. 2017, §5.3) on ``nav2d`` and
``halfcheetah_vel``: :class:`MAMLRL`, the losses, the inner steps and the training loop; the
rollouts (:mod:`~metaserve.workers.rl.rollouts`), advantages (:mod:`~metaserve.workers.rl.advantages`)
and the TRPO step (:mod:`~metaserve.workers.rl.trpo`) live beside it.

Per meta-iteration, for each of ``meta_batch_size`` tasks: ``episodes_per_task`` trajectories
are sampled with the meta-policy θ, the inner loop takes ``inner_steps`` vanilla policy
gradient steps θ' = θ − α ∇L_VPG(θ) (new trajectories for every step), and trajectories of
the adapted policy θ' give the outer objective, the surrogate E[π_θ'(θ)/π_old · A] of the
adapted policy against the policy that sampled the trajectories, differentiated through the
inner steps (second order unless ``first_order``). The outer step is either

* ``outer: trpo`` -- the paper's natural-gradient step with a KL bound (see
  :mod:`~metaserve.workers.rl.trpo`); or
* ``outer: ppo`` -- PPO's clipped surrogate (Schulman et al. 2017), ``outer_epochs`` steps of
  ``outer_optimizer`` per meta-batch.

With ``normalize_actions`` the policy acts in [-1, 1] units scaled to the family's max action,
as the paper's code does (rllab's ``normalize`` wrapper), so the initial std is 1/10 of the
action range rather than 10 times it.

The inner loss is written with the likelihood ratio π_θ/π_θ_sample, as ProMP's LVC objective
(Rothfuss et al. 2019): at θ = θ_sample its gradient is the VPG estimate, and differentiating
the inner step through it gives the low-variance curvature (LVC) estimate of the Hessian of the
inner objective. That estimate is biased: it drops the term of the exact Hessian that
correlates the score functions of different time steps (which DiCE keeps, at a far higher
variance), so the meta-gradient is not the exact second-order MAML gradient. Advantages: GAE
over rllab's linear feature baseline fitted per task (the baseline of the MAML paper),
normalized per task. The per-task inner loops are vectorized with ``torch.func.vmap``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from metaserve.workers.engine.checkpoints import load_optimizer_tensors, optimizer_tensors
from metaserve.workers.rl.advantages import gae_advantages
from metaserve.workers.rl.policies import GaussianMLPPolicy, expand_params, gaussian_kl, gaussian_log_prob
from metaserve.workers.rl.rollouts import Trajectories, rollout_envs, rollout_nav2d
from metaserve.workers.rl.tasks import Nav2DFamily, build_rl_family
from metaserve.workers.rl.trpo import kl_hvp, trpo_step
from metaserve.workers.spec import JobSpec, PolicyGradientSpec
from metaserve.workers.tasks.base import task_seed

Params = dict[str, Tensor]

ROLLOUT_STREAM = 1_000_003  # task index of the per-iteration rollout-noise seed


class MAMLRL:
    """MAML-RL (see the module docstring); the state is (θ, Adam, iteration, env steps)."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.algorithm = spec.algorithm
        self.pg: PolicyGradientSpec = spec.algorithm.policy_gradient or PolicyGradientSpec()
        self.family = build_rl_family(spec.task_family)
        if self.family.discrete:
            raise ValueError(f"maml-rl needs continuous actions, not {self.family.name}")
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            self.policy = GaussianMLPPolicy(self.family.observation_size, self.family.action_size,
                                            list(self.pg.hidden), self.pg.init_log_std)
        self.params = {name: p.detach().clone().requires_grad_(True)
                       for name, p in self.policy.named_parameters()}
        self.optimizer = self._make_optimizer()
        self.action_scale = self.family.max_action if self.pg.normalize_actions else 1.0
        self._envs: list = []  # gymnasium envs of non-nav2d families, reused
        self.iteration = 0
        self.env_steps = 0

    def _make_optimizer(self) -> torch.optim.Optimizer:
        optimizer = self.spec.outer_optimizer
        parameters = list(self.params.values())
        if optimizer.name == "adam":
            return torch.optim.Adam(parameters, lr=optimizer.lr)
        return torch.optim.SGD(parameters, lr=optimizer.lr)

    # ------------------------------------------------------------------ policy and rollouts

    def policy_outputs(self, params: dict[str, Tensor], observations: Tensor) -> tuple[Tensor, Tensor]:
        """(means, log stds) of the policy with parameters ``params`` at ``observations``."""
        return functional_call(self.policy, params, (observations,))

    def rollout(self, task_params: dict[str, Tensor], goals: Tensor, episodes: int,
                generator: torch.Generator) -> Trajectories:
        """``episodes`` episodes per task with per-task parameters [T, ...], their advantages
        filled in; ``goals`` [T, ·] holds each task's ``goal`` (a position on nav2d, a velocity
        on halfcheetah_vel)."""
        policy = vmap(self.policy_outputs)
        if isinstance(self.family, Nav2DFamily):
            nav = self.family.spec
            trajectories = rollout_nav2d(policy, task_params, goals, episodes, generator,
                                         horizon=nav.horizon, max_action=nav.max_action,
                                         action_scale=self.action_scale)
        else:
            trajectories = rollout_envs(policy, task_params, goals, episodes, generator,
                                        family=self.family, envs=self._envs,
                                        action_scale=self.action_scale)
        trajectories.advantages = gae_advantages(trajectories, self.pg.gamma, self.pg.gae_lambda)
        return trajectories

    # ------------------------------------------------------------------ losses

    def _inner_loss(self, params, observations, actions, advantages, mask, log_probs):  # noqa: ANN001, ANN202
        mean, log_std = self.policy_outputs(params, observations)
        ratio = torch.exp(gaussian_log_prob(mean, log_std, actions) - log_probs)
        return -(ratio * advantages * mask).sum() / mask.sum().clamp_min(1)

    def adapt(self, task_params: dict[str, Tensor], data: Trajectories, *,
              create_graph: bool, step: int = 0) -> dict[str, Tensor]:
        """One VPG step per task (vectorized): θ' = θ − α ∇L_VPG(θ); α = ``inner_lr`` for the
        first step (``step`` 0), ``later_inner_lr`` (if set) for the later ones."""
        gradients = vmap(grad(self._inner_loss))(task_params, data.observations, data.actions,
                                                 data.advantages, data.mask, data.log_probs)
        lr = self.algorithm.inner_lr
        if step > 0 and self.pg.later_inner_lr is not None:
            lr = self.pg.later_inner_lr
        if not create_graph:
            gradients = {k: g.detach() for k, g in gradients.items()}
        return {k: task_params[k] - lr * gradients[k] for k in task_params}

    def adapt_all(self, theta: Params, batches: list[Trajectories], *,
                  create_graph: bool = True) -> Params:
        """θ'(θ) per task [T, ...]: the inner steps on ``batches`` from the shared θ."""
        adapted = expand_params(theta, batches[0].observations.shape[0]) if batches else None
        for step, batch in enumerate(batches):
            adapted = self.adapt(adapted, batch, create_graph=create_graph, step=step)
        return adapted

    @staticmethod
    def _task_mean(values: Tensor, mask: Tensor) -> Tensor:
        """Mean over tasks of the per-task mean over the steps taken."""
        return ((values * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1)).mean()

    def _outer_loss(self, adapted: dict[str, Tensor], data: Trajectories) -> Tensor:
        """PPO: minus the clipped surrogate of the adapted policies."""
        mean, log_std = vmap(self.policy_outputs)(adapted, data.observations)
        ratio = torch.exp(gaussian_log_prob(mean, log_std, data.actions) - data.log_probs)
        clipped = ratio.clamp(1 - self.pg.clip, 1 + self.pg.clip)
        surrogate = torch.minimum(ratio * data.advantages, clipped * data.advantages)
        return -self._task_mean(surrogate, data.mask)

    def surrogate(self, adapted: Params, data: Trajectories) -> Tensor:
        """E[π_θ'(a|s)/π_old(a|s) · A] on the adapted policies' trajectories (TRPO's objective)."""
        mean, log_std = vmap(self.policy_outputs)(adapted, data.observations)
        ratio = torch.exp(gaussian_log_prob(mean, log_std, data.actions) - data.log_probs)
        return self._task_mean(ratio * data.advantages, data.mask)

    def mean_kl(self, old: tuple[Tensor, Tensor], adapted: Params, data: Trajectories) -> Tensor:
        """Mean KL(π_old ‖ π_adapted) over the states of ``data`` (old = (mean, log_std))."""
        mean, log_std = vmap(self.policy_outputs)(adapted, data.observations)
        return self._task_mean(gaussian_kl(old[0], old[1], mean, log_std), data.mask)

    # ------------------------------------------------------------------ outer steps

    def _ppo_step(self, batches: list[Trajectories], post: Trajectories) -> dict[str, float]:
        create_graph = not self.algorithm.first_order
        for _ in range(self.pg.outer_epochs):
            adapted = expand_params(self.params, post.observations.shape[0])
            for step, batch in enumerate(batches):
                adapted = self.adapt(adapted, batch, create_graph=create_graph, step=step)
            loss = self._outer_loss(adapted, post)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return {"train/outer_loss": float(loss.detach())}

    def kl_hvp(self, theta: Params, batches: list[Trajectories], data: Trajectories):  # noqa: ANN201
        """See :func:`metaserve.workers.rl.trpo.kl_hvp`."""
        return kl_hvp(self, theta, batches, data)

    def _trpo_step(self, batches: list[Trajectories], post: Trajectories) -> dict[str, float]:
        return trpo_step(self, batches, post)

    # ------------------------------------------------------------------ training

    def _goals(self, split: str, iteration: int, count: int) -> Tensor:
        tasks = self.family.sample_tasks(seed=self.spec.seed, split=split, iteration=iteration,
                                         task_indices=range(count))
        return torch.from_numpy(np.stack([task["goal"] for task in tasks])).float()

    def _generator(self, split: str, iteration: int) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(task_seed(self.spec.seed, split, iteration, ROLLOUT_STREAM))
        return generator

    def train_iteration(self) -> dict[str, float]:
        """One meta-iteration (rollouts, inner steps, ``outer_epochs`` outer steps)."""
        goals = self._goals("train", self.iteration, self.spec.meta_batch_size)
        generator = self._generator("train", self.iteration)
        tasks, episodes = goals.shape[0], self.pg.episodes_per_task
        steps = self.algorithm.inner_steps
        detached = {k: v.detach() for k, v in self.params.items()}
        batches: list[Trajectories] = []
        task_params = expand_params(detached, tasks)
        for step in range(steps):  # sample the pre-update trajectories of every inner step
            batches.append(self.rollout(task_params, goals, episodes, generator))
            task_params = self.adapt(task_params, batches[-1], create_graph=False, step=step)
        post = self.rollout(task_params, goals, episodes, generator)
        if self.pg.outer == "trpo":
            metrics = self._trpo_step(batches, post)
        else:
            metrics = self._ppo_step(batches, post)
        self.iteration += 1
        self.env_steps += sum(b.steps for b in batches) + post.steps
        before = batches[0] if batches else post
        return {"train/return_before": float(before.episode_returns.mean()),
                "train/return_after": float(post.episode_returns.mean()),
                **metrics}

    def evaluate(self, split: str, *, tasks: int | None = None,
                 inner_steps: list[int] | None = None) -> dict[str, float]:
        """Average return on held-out tasks before and after k PG steps (k in ``inner_steps``)."""
        count = tasks or self.spec.evaluation.tasks
        results = self.evaluate_goals(self._goals(split, 0, count),
                                      inner_steps or self.spec.evaluation.inner_steps,
                                      generator=self._generator(split, 0))
        return {f"{split}/{name}": value for name, value in results.items()}

    def evaluate_goals(self, goals: Tensor, inner_steps: list[int], *, seed: int = 0,
                       generator: torch.Generator | None = None) -> dict[str, float]:
        """``return_step{k}`` (and its 95% CI half-width) for k = 0 and each of ``inner_steps``."""
        count = goals.shape[0]
        reported = sorted(set([0, *inner_steps]))
        generator = generator or torch.Generator().manual_seed(seed)
        task_params = expand_params({k: v.detach() for k, v in self.params.items()}, count)
        results: dict[str, float] = {}
        for step in range(reported[-1] + 1):
            data = self.rollout(task_params, goals, self.pg.episodes_per_task, generator)
            if step in reported:
                per_task = data.episode_returns.mean(1)
                half_width = 1.96 * float(per_task.std()) / max(count, 1) ** 0.5 if count > 1 else 0.0
                results[f"return_step{step}"] = float(per_task.mean())
                results[f"return_step{step}_ci95"] = half_width
            if step < reported[-1]:
                task_params = self.adapt(task_params, data, create_graph=False, step=step)
        return results

    # ------------------------------------------------------------------ state

    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {f"params/{k}": v.detach().clone() for k, v in self.params.items()}
        tensors.update(optimizer_tensors(self.optimizer, "optimizer/", list(self.params)))
        return tensors, {"iteration": self.iteration, "env_steps": self.env_steps}

    def load_state(self, tensors: dict[str, Tensor], document: dict) -> None:
        with torch.no_grad():
            for name, value in self.params.items():
                value.copy_(tensors[f"params/{name}"])
        load_optimizer_tensors(self.optimizer, tensors, "optimizer/", list(self.params))
        self.iteration = int(document["iteration"])
        self.env_steps = int(document["env_steps"])

    def close(self) -> None:
        for env in self._envs:
            env.close()
        self._envs = []

    def meta_policy(self) -> tuple[dict[str, Tensor], dict]:
        """The meta-policy tensors and the recipe :func:`metaserve.workers.rl.load_meta_policy` reads."""
        architecture = {"kind": "gaussian_mlp", "observation_size": self.family.observation_size,
                        "action_size": self.family.action_size,
                        "hidden": list(self.pg.hidden)}
        recipe = {"algorithm": "maml", "adaptation": "vpg", "inner_lr": self.algorithm.inner_lr,
                  "later_inner_lr": self.pg.later_inner_lr,
                  "inner_steps": self.algorithm.inner_steps,
                  "episodes_per_task": self.pg.episodes_per_task, "gamma": self.pg.gamma,
                  "gae_lambda": self.pg.gae_lambda, "action_scale": self.action_scale}
        return ({k: v.detach().clone() for k, v in self.params.items()},
                {"architecture": architecture, "recipe": recipe})
