"""MAML with a policy-gradient inner loop (Finn et al. 2017, §5.3) on ``nav2d`` and
``halfcheetah_vel``.

Per meta-iteration, for each of ``meta_batch_size`` tasks: ``episodes_per_task`` trajectories
are sampled with the meta-policy θ, the inner loop takes ``inner_steps`` vanilla policy
gradient steps θ' = θ − α ∇L_VPG(θ) (new trajectories for every step), and trajectories of
the adapted policy θ' give the outer objective, the surrogate E[π_θ'(θ)/π_old · A] of the
adapted policy against the policy that sampled the trajectories, differentiated through the
inner steps (second order unless ``first_order``). The outer step is either

* ``outer: trpo`` -- the paper's: g = ∇_θ surrogate, x ≈ H⁻¹g by conjugate gradient, where H
  is the Hessian of the mean KL(π_θ'old ‖ π_θ'(θ)) through the inner steps; at θ_old it is
  Jᵀ F J (J = ∂θ'/∂θ, F = the KL Hessian in θ', since ∇KL = 0 there), computed as a
  forward-mode product through the inner step, F by double differentiation of the analytic
  Gaussian KL, and a backward product; step √(2δ / xᵀHx)·x, shrunk by ``backtrack_ratio``
  until the surrogate improves and the mean KL ≤ δ = ``max_kl`` (else no step); or
* ``outer: ppo`` -- PPO's clipped surrogate (Schulman et al. 2017), ``outer_epochs`` steps of
  ``outer_optimizer`` per meta-batch.

With ``normalize_actions`` the policy acts in [-1, 1] units scaled to the family's max action,
as the paper's code does (rllab's ``normalize`` wrapper), so the initial std is 1/10 of the
action range rather than 10 times it.

The inner loss is written with the likelihood ratio π_θ/π_θ_sample (as in ProMP, Rothfuss et
al. 2019): at θ = θ_sample its gradient is the VPG estimate, and its Hessian has the
correct second-order term. Advantages: GAE over rllab's linear feature baseline fitted
per task (the baseline of the MAML paper), normalized per task.

On ``nav2d`` the trajectories of all tasks are simulated at once (tensor ops over ``[tasks,
episodes]``); other families step one gymnasium env per (task, episode), reused across
iterations, with the policy evaluated for all of them in one call. The per-task inner loops
are vectorized with ``torch.func.vmap``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from metaserve.workers.engine.checkpoints import load_optimizer_tensors, optimizer_tensors
from metaserve.workers.rl.policies import GaussianMLPPolicy, gaussian_log_prob
from metaserve.workers.rl.tasks import GOAL_TOLERANCE, Nav2DFamily, build_rl_family
from metaserve.workers.spec import JobSpec, PolicyGradientSpec
from metaserve.workers.tasks.base import task_seed

Params = dict[str, Tensor]

BASELINE_RIDGE = 1e-5
ROLLOUT_STREAM = 1_000_003  # task index of the per-iteration rollout-noise seed


@dataclass
class Trajectories:
    """Rollouts of ``T`` tasks × ``E`` episodes × ``H`` steps."""

    observations: Tensor  # [T, E, H, observation size]
    actions: Tensor  # [T, E, H, action size]
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


def conjugate_gradient(matvec, b: Tensor, iterations: int, tolerance: float = 1e-10) -> Tensor:
    """x ≈ A⁻¹b for symmetric positive (semi)definite A given as ``matvec`` (Hestenes–Stiefel)."""
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    rr = residual @ residual
    for _ in range(iterations):
        if rr <= tolerance:
            break
        product = matvec(direction)
        step = rr / (direction @ product)
        x = x + step * direction
        residual = residual - step * product
        rr_next = residual @ residual
        direction = residual + (rr_next / rr) * direction
        rr = rr_next
    return x


def flatten(params: Params) -> Tensor:
    return torch.cat([value.reshape(-1) for value in params.values()])


def unflatten(vector: Tensor, like: Params) -> Params:
    out, start = {}, 0
    for name, value in like.items():
        out[name] = vector[start:start + value.numel()].view_as(value)
        start += value.numel()
    return out


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """KL(N(mean_p, σ_p²) ‖ N(mean_q, σ_q²)) of diagonal Gaussians, summed over the action axis."""
    var_p, var_q = (2 * log_std_p).exp(), (2 * log_std_q).exp()
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)


def expand_params(params: dict[str, Tensor], tasks: int) -> dict[str, Tensor]:
    return {name: value.unsqueeze(0).expand(tasks, *value.shape) for name, value in params.items()}


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

    def _policy(self, params: dict[str, Tensor], observations: Tensor) -> tuple[Tensor, Tensor]:
        return functional_call(self.policy, params, (observations,))

    @torch.no_grad()
    def rollout(self, task_params: dict[str, Tensor], goals: Tensor, episodes: int,
                generator: torch.Generator) -> Trajectories:
        """Simulate ``episodes`` episodes per task with per-task parameters [T, ...]; ``goals``
        [T, ·] holds each task's ``goal`` (a position on nav2d, a velocity on halfcheetah_vel)."""
        if isinstance(self.family, Nav2DFamily):
            trajectories = self._rollout_nav2d(task_params, goals, episodes, generator)
        else:
            trajectories = self._rollout_envs(task_params, goals, episodes, generator)
        trajectories.advantages = self.advantages(trajectories)
        return trajectories

    def _rollout_envs(self, task_params: dict[str, Tensor], goals: Tensor, episodes: int,
                      generator: torch.Generator) -> Trajectories:
        """One gymnasium env per (task, episode), all stepped in lockstep; an env's initial
        state is seeded from ``generator``, so a rollout is reproducible."""
        tasks = goals.shape[0]
        count = tasks * episodes
        while len(self._envs) < count:
            self._envs.append(self.family.make_env())
        envs = self._envs[:count]
        seeds = torch.randint(2**31 - 1, (count,), generator=generator).tolist()
        first = []
        for index, env in enumerate(envs):
            env.set_task({"goal": goals[index // episodes].numpy().astype(np.float64)})
            first.append(env.reset(seed=seeds[index])[0])
        observation = torch.from_numpy(np.stack(first)).float().reshape(tasks, episodes, -1)
        alive = torch.ones(tasks, episodes, dtype=torch.bool)
        trace: dict[str, list[Tensor]] = {k: [] for k in ("obs", "act", "rew", "mask", "logp")}
        policy = vmap(self._policy)
        limit = self.family.max_action
        for _ in range(self.family.max_episode_steps):
            mean, log_std = policy(task_params, observation)
            action = mean + log_std.exp() * torch.randn(mean.shape, generator=generator)
            applied = (action * self.action_scale).clamp(-limit, limit).reshape(count, -1).numpy()
            running = alive.reshape(-1).tolist()
            observations, rewards = [], np.zeros(count)
            ended = np.zeros(count, dtype=bool)
            for index, env in enumerate(envs):
                if not running[index]:
                    observations.append(observation.reshape(count, -1)[index].numpy())
                    continue
                next_observation, reward, terminated, truncated, _ = env.step(applied[index])
                observations.append(next_observation)
                rewards[index] = reward
                ended[index] = terminated or truncated
            mask = alive.float()
            trace["obs"].append(observation)
            trace["act"].append(action)
            trace["rew"].append(torch.from_numpy(rewards).float().reshape(tasks, episodes) * mask)
            trace["mask"].append(mask)
            trace["logp"].append(gaussian_log_prob(mean, log_std, action))
            observation = torch.from_numpy(np.stack(observations)).float().reshape(tasks, episodes, -1)
            alive = alive & ~torch.from_numpy(ended).reshape(tasks, episodes)
        stacked = {k: torch.stack(v, dim=2) for k, v in trace.items()}
        return Trajectories(stacked["obs"], stacked["act"], stacked["rew"], stacked["mask"],
                            stacked["logp"])

    def _rollout_nav2d(self, task_params: dict[str, Tensor], goals: Tensor, episodes: int,
                       generator: torch.Generator) -> Trajectories:
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
            moved = position + (action * self.action_scale).clamp(-spec.max_action, spec.max_action)
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
        return Trajectories(stacked["obs"], stacked["act"], stacked["rew"], stacked["mask"],
                            stacked["logp"])

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
        mean, log_std = vmap(self._policy)(adapted, data.observations)
        ratio = torch.exp(gaussian_log_prob(mean, log_std, data.actions) - data.log_probs)
        clipped = ratio.clamp(1 - self.pg.clip, 1 + self.pg.clip)
        surrogate = torch.minimum(ratio * data.advantages, clipped * data.advantages)
        return -self._task_mean(surrogate, data.mask)

    def surrogate(self, adapted: Params, data: Trajectories) -> Tensor:
        """E[π_θ'(a|s)/π_old(a|s) · A] on the adapted policies' trajectories (TRPO's objective)."""
        mean, log_std = vmap(self._policy)(adapted, data.observations)
        ratio = torch.exp(gaussian_log_prob(mean, log_std, data.actions) - data.log_probs)
        return self._task_mean(ratio * data.advantages, data.mask)

    def mean_kl(self, old: tuple[Tensor, Tensor], adapted: Params, data: Trajectories) -> Tensor:
        """Mean KL(π_old ‖ π_adapted) over the states of ``data`` (old = (mean, log_std))."""
        mean, log_std = vmap(self._policy)(adapted, data.observations)
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
        """v ↦ H v with H the Hessian at θ of the mean KL(π_θ'(θ_old) ‖ π_θ'(θ)) through the inner
        steps: Jᵀ F J v (exact at θ_old, see the module docstring). With ``first_order``, J = I;
        with one inner step J_t = I − α ∇²L_t(θ) is symmetric, so J v is a second backward
        product (cheaper than forward mode through the inner gradient)."""
        theta = {k: v.detach() for k, v in theta.items()}
        tasks = data.observations.shape[0]
        if self.algorithm.first_order or not batches:
            adapted = expand_params(theta, tasks)
            push = lambda tangent: expand_params(tangent, tasks)  # noqa: E731
            pull = lambda cotangent: {k: v.sum(0) for k, v in cotangent.items()}  # noqa: E731
        elif len(batches) == 1:
            per_task = {k: v.clone() for k, v in expand_params(theta, tasks).items()}
            adapted, task_pullback = torch.func.vjp(
                lambda p: self.adapt(p, batches[0], create_graph=True), per_task)

            def push(tangent: Params) -> Params:
                return task_pullback({k: v.clone() for k, v in expand_params(tangent, tasks).items()})[0]

            def pull(cotangent: Params) -> Params:
                return {k: v.sum(0) for k, v in task_pullback(cotangent)[0].items()}
        else:
            def inner(th: Params) -> Params:
                return self.adapt_all(th, batches)

            adapted, pullback = torch.func.vjp(inner, theta)
            push = lambda tangent: torch.func.jvp(inner, (theta,), (tangent,))[1]  # noqa: E731
            pull = lambda cotangent: pullback(cotangent)[0]  # noqa: E731
        adapted = {k: v.detach() for k, v in adapted.items()}
        with torch.no_grad():
            old = vmap(self._policy)(adapted, data.observations)
        kl_gradient = grad(lambda a: self.mean_kl(old, a, data))

        def product(vector: Tensor) -> Tensor:
            pushed = push(unflatten(vector, theta))
            _, fisher = torch.func.jvp(kl_gradient, (adapted,), (pushed,))
            return flatten(pull(fisher)).detach()

        return product

    def _trpo_step(self, batches: list[Trajectories], post: Trajectories) -> dict[str, float]:
        pg = self.pg
        theta = {k: v.detach() for k, v in self.params.items()}
        create_graph = not self.algorithm.first_order
        leaf = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        adapted = expand_params(leaf, post.observations.shape[0])
        for step, batch in enumerate(batches):
            adapted = self.adapt(adapted, batch, create_graph=create_graph, step=step)
        objective = self.surrogate(adapted, post)
        gradient = flatten(dict(zip(leaf, torch.autograd.grad(objective, list(leaf.values())))))
        hvp = self.kl_hvp(theta, batches, post)

        def damped(vector: Tensor) -> Tensor:
            return hvp(vector) + pg.cg_damping * vector

        direction = conjugate_gradient(damped, gradient, pg.cg_iters)
        curvature = float(direction @ damped(direction))
        metrics = {"train/surrogate_before": float(objective.detach()),  # same keys every step
                   "train/surrogate_after": float(objective.detach()), "train/kl": 0.0,
                   "train/line_search_steps": float(pg.line_search_steps)}
        if not curvature > 0 or not torch.isfinite(direction).all():
            return metrics
        full_step = (2 * pg.max_kl / curvature) ** 0.5 * direction
        with torch.no_grad():
            old_adapted = self.adapt_all(theta, batches, create_graph=False) if batches \
                else expand_params(theta, post.observations.shape[0])
            old = vmap(self._policy)(old_adapted, post.observations)
        start = flatten(theta)
        for attempt in range(pg.line_search_steps):
            candidate = unflatten(start + pg.backtrack_ratio ** attempt * full_step, theta)
            with torch.no_grad():
                adapted = self.adapt_all(candidate, batches, create_graph=False) if batches \
                    else expand_params(candidate, post.observations.shape[0])
                value = self.surrogate(adapted, post)
                kl = self.mean_kl(old, adapted, post)
            if torch.isfinite(value) and value > objective and kl <= pg.max_kl:
                with torch.no_grad():
                    for name, parameter in self.params.items():
                        parameter.copy_(candidate[name])
                metrics.update({"train/surrogate_after": float(value), "train/kl": float(kl),
                                "train/line_search_steps": float(attempt)})
                break
        return metrics

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
