"""MAML with a policy-gradient inner loop (Finn et al. 2017, §5.3) on ``nav2d``.

Per meta-iteration, for each of ``meta_batch_size`` tasks: ``episodes_per_task`` trajectories
are sampled with the meta-policy θ, the inner loop takes ``inner_steps`` vanilla policy
gradient steps θ' = θ − α ∇L_VPG(θ) (new trajectories for every step), and trajectories of
the adapted policy θ' give the outer objective: PPO's clipped surrogate (Schulman et al.
2017) of π_θ'(θ) against the policy that sampled them, differentiated through the inner
steps (second order unless ``first_order``), ``outer_epochs`` Adam steps per meta-batch.

The inner loss is written with the likelihood ratio π_θ/π_θ_sample (as in ProMP, Rothfuss et
al. 2019): at θ = θ_sample its gradient is the VPG estimate, and its Hessian has the
correct second-order term. Advantages: GAE over rllab's linear feature baseline fitted
per task (the baseline of the MAML paper), normalized per task.

Trajectories of all tasks are simulated at once (tensor ops over ``[tasks, episodes]``) and
the per-task inner loops are vectorized with ``torch.func.vmap``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from workers.rl.policies import GaussianMLPPolicy, gaussian_log_prob
from workers.rl.tasks import GOAL_TOLERANCE, Nav2DFamily, build_rl_family
from workers.spec import JobSpec, PolicyGradientSpec
from workers.tasks.base import task_seed

BASELINE_RIDGE = 1e-5
ROLLOUT_STREAM = 1_000_003  # task index of the per-iteration rollout-noise seed


@dataclass
class Trajectories:
    """Rollouts of ``T`` tasks × ``E`` episodes × ``H`` steps."""

    observations: Tensor  # [T, E, H, 2]
    actions: Tensor  # [T, E, H, 2]
    rewards: Tensor  # [T, E, H] (0 after the episode ended)
    mask: Tensor  # [T, E, H] float, 1 while the episode runs
    log_probs: Tensor  # [T, E, H] of the sampling policy
    advantages: Tensor | None = None  # [T, E, H]

    @property
    def episode_returns(self) -> Tensor:  # [T, E]
        return self.rewards.sum(-1)

    @property
    def steps(self) -> int:
        return int(self.mask.sum())


def expand_params(params: dict[str, Tensor], tasks: int) -> dict[str, Tensor]:
    return {name: value.unsqueeze(0).expand(tasks, *value.shape) for name, value in params.items()}


class MAMLRL:
    """MAML-RL (see the module docstring); the state is (θ, Adam, iteration, env steps)."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.algorithm = spec.algorithm
        self.pg: PolicyGradientSpec = spec.algorithm.policy_gradient or PolicyGradientSpec()
        self.family = build_rl_family(spec.task_family)
        if not isinstance(self.family, Nav2DFamily):
            raise ValueError(f"maml runs on nav2d, not {self.family.name}")
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            self.policy = GaussianMLPPolicy(2, 2, list(self.pg.hidden), self.pg.init_log_std)
        self.params = {name: p.detach().clone().requires_grad_(True)
                       for name, p in self.policy.named_parameters()}
        self.optimizer = self._make_optimizer()
        self.iteration = 0
        self.env_steps = 0

    def _make_optimizer(self) -> torch.optim.Optimizer:
        optimizer = self.spec.outer_optimizer
        parameters = list(self.params.values())
        if optimizer.name == "adam":
            return torch.optim.Adam(parameters, lr=optimizer.lr)
        return torch.optim.SGD(parameters, lr=optimizer.lr)

    # ------------------------------------------------------------------ policy and rollouts

    def _policy(self, params: dict[str, Tensor], observations: Tensor) -> tuple[Tensor, Tensor]:
        return functional_call(self.policy, params, (observations,))

    @torch.no_grad()
    def rollout(self, task_params: dict[str, Tensor], goals: Tensor, episodes: int,
                generator: torch.Generator) -> Trajectories:
        """Simulate ``episodes`` episodes per task with per-task parameters [T, ...]."""
        spec = self.family.spec
        tasks = goals.shape[0]
        position = torch.zeros(tasks, episodes, 2)
        alive = torch.ones(tasks, episodes, dtype=torch.bool)
        goal = goals[:, None, :].expand(tasks, episodes, 2)
        trace: dict[str, list[Tensor]] = {k: [] for k in ("obs", "act", "rew", "mask", "logp")}
        policy = vmap(self._policy)
        for _ in range(spec.horizon):
            mean, log_std = policy(task_params, position)
            action = mean + log_std.exp() * torch.randn(mean.shape, generator=generator)
            moved = position + action.clamp(-spec.max_action, spec.max_action)
            offset = moved - goal
            running = alive.float()
            trace["obs"].append(position)
            trace["act"].append(action)
            trace["rew"].append(-offset.norm(dim=-1) * running)
            trace["mask"].append(running)
            trace["logp"].append(gaussian_log_prob(mean, log_std, action))
            position = torch.where(alive[..., None], moved, position)
            alive = alive & ~(offset.abs() < GOAL_TOLERANCE).all(-1)
        stacked = {k: torch.stack(v, dim=2) for k, v in trace.items()}
        trajectories = Trajectories(stacked["obs"], stacked["act"], stacked["rew"],
                                    stacked["mask"], stacked["logp"])
        trajectories.advantages = self.advantages(trajectories)
        return trajectories

    def advantages(self, t: Trajectories) -> Tensor:
        """GAE(γ, λ) over a per-task linear feature baseline, normalized per task."""
        gamma, lam = self.pg.gamma, self.pg.gae_lambda
        tasks, episodes, horizon = t.rewards.shape
        returns = torch.zeros_like(t.rewards)
        running = torch.zeros(tasks, episodes)
        for step in reversed(range(horizon)):
            running = t.rewards[..., step] + gamma * running * t.mask[..., step]
            returns[..., step] = running
        time = torch.arange(horizon, dtype=torch.float32).expand(tasks, episodes, horizon)[..., None] / 100
        obs = t.observations.clamp(-10, 10)
        features = torch.cat([obs, obs ** 2, time, time ** 2, time ** 3, torch.ones_like(time)], -1)
        features = features * t.mask[..., None]
        x = features.reshape(tasks, -1, features.shape[-1])
        y = (returns * t.mask).reshape(tasks, -1, 1)
        eye = torch.eye(x.shape[-1]) * BASELINE_RIDGE
        gram = x.transpose(1, 2) @ x
        for ridge in (1.0, 10.0, 100.0, 1000.0):  # rllab's retry on ill-conditioning
            try:
                weights = torch.linalg.solve(gram + ridge * eye, x.transpose(1, 2) @ y)
                break
            except RuntimeError:
                continue
        baseline = (x @ weights).reshape(tasks, episodes, horizon) * t.mask
        next_baseline = torch.cat([baseline[..., 1:], torch.zeros(tasks, episodes, 1)], -1)
        deltas = (t.rewards + gamma * next_baseline - baseline) * t.mask
        advantages = torch.zeros_like(deltas)
        running = torch.zeros(tasks, episodes)
        for step in reversed(range(horizon)):
            running = deltas[..., step] + gamma * lam * running * t.mask[..., step]
            advantages[..., step] = running
        count = t.mask.sum((1, 2), keepdim=True).clamp_min(1)
        mean = (advantages * t.mask).sum((1, 2), keepdim=True) / count
        var = ((advantages - mean) ** 2 * t.mask).sum((1, 2), keepdim=True) / count
        return (advantages - mean) / (var.sqrt() + 1e-8) * t.mask

    # ------------------------------------------------------------------ losses

    def _inner_loss(self, params, observations, actions, advantages, mask, log_probs):  # noqa: ANN001, ANN202
        mean, log_std = self._policy(params, observations)
        ratio = torch.exp(gaussian_log_prob(mean, log_std, actions) - log_probs)
        return -(ratio * advantages * mask).sum() / mask.sum().clamp_min(1)

    def adapt(self, task_params: dict[str, Tensor], data: Trajectories, *,
              create_graph: bool) -> dict[str, Tensor]:
        """One VPG step per task (vectorized): θ' = θ − α ∇L_VPG(θ)."""
        gradients = vmap(grad(self._inner_loss))(task_params, data.observations, data.actions,
                                                 data.advantages, data.mask, data.log_probs)
        lr = self.algorithm.inner_lr
        if not create_graph:
            gradients = {k: g.detach() for k, g in gradients.items()}
        return {k: task_params[k] - lr * gradients[k] for k in task_params}

    def _outer_loss(self, adapted: dict[str, Tensor], data: Trajectories) -> Tensor:
        mean, log_std = vmap(self._policy)(adapted, data.observations)
        ratio = torch.exp(gaussian_log_prob(mean, log_std, data.actions) - data.log_probs)
        clipped = ratio.clamp(1 - self.pg.clip, 1 + self.pg.clip)
        surrogate = torch.minimum(ratio * data.advantages, clipped * data.advantages) * data.mask
        per_task = surrogate.sum((1, 2)) / data.mask.sum((1, 2)).clamp_min(1)
        return -per_task.mean()

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
        for _ in range(steps):  # sample the pre-update trajectories of every inner step
            batches.append(self.rollout(task_params, goals, episodes, generator))
            task_params = self.adapt(task_params, batches[-1], create_graph=False)
        post = self.rollout(task_params, goals, episodes, generator)
        create_graph = not self.algorithm.first_order
        for _ in range(self.pg.outer_epochs):
            adapted = expand_params(self.params, tasks)
            for batch in batches:
                adapted = self.adapt(adapted, batch, create_graph=create_graph)
            loss = self._outer_loss(adapted, post)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.iteration += 1
        self.env_steps += sum(b.steps for b in batches) + post.steps
        before = batches[0] if batches else post
        return {"train/return_before": float(before.episode_returns.mean()),
                "train/return_after": float(post.episode_returns.mean()),
                "train/outer_loss": float(loss.detach()),
                "train/env_steps": float(self.env_steps)}

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
                task_params = self.adapt(task_params, data, create_graph=False)
        return results

    # ------------------------------------------------------------------ state

    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {f"params/{k}": v.detach().clone() for k, v in self.params.items()}
        names = list(self.params)
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optimizer/{names[index]}/{key}"] = torch.as_tensor(value).clone()
        return tensors, {"iteration": self.iteration, "env_steps": self.env_steps}

    def load_state(self, tensors: dict[str, Tensor], document: dict) -> None:
        with torch.no_grad():
            for name, value in self.params.items():
                value.copy_(tensors[f"params/{name}"])
        names = list(self.params)
        optimizer_state = self.optimizer.state_dict()
        state: dict[int, dict[str, Tensor]] = {}
        for index, name in enumerate(names):
            prefix = f"optimizer/{name}/"
            entries = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entries:
                state[index] = entries
        optimizer_state["state"] = state
        self.optimizer.load_state_dict(optimizer_state)
        self.iteration = int(document["iteration"])
        self.env_steps = int(document["env_steps"])

    def meta_policy(self) -> tuple[dict[str, Tensor], dict]:
        """The meta-policy tensors and the recipe :func:`workers.rl.load_meta_policy` reads."""
        architecture = {"kind": "gaussian_mlp", "observation_size": 2, "action_size": 2,
                        "hidden": list(self.pg.hidden)}
        recipe = {"algorithm": "maml", "adaptation": "vpg", "inner_lr": self.algorithm.inner_lr,
                  "inner_steps": self.algorithm.inner_steps,
                  "episodes_per_task": self.pg.episodes_per_task, "gamma": self.pg.gamma,
                  "gae_lambda": self.pg.gae_lambda}
        return ({k: v.detach().clone() for k, v in self.params.items()},
                {"architecture": architecture, "recipe": recipe})
