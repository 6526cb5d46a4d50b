"""PEARL (Rakelly et al. 2019) on ``nav2d``: probabilistic embeddings for off-policy meta-RL.

- Context encoder q(z|c): an MLP maps each transition (s, a, r, s') to a Gaussian factor
  N(μ_i, σ_i²); the posterior is their product (σ² = 1/Σ σ_i⁻², μ = σ² Σ μ_i/σ_i²), trained by
  the critic's loss plus ``kl_weight`` · KL(q(z|c) ‖ N(0, I)) (plus, if ``reward_loss_weight``,
  a decoder's reward-prediction loss; 0 by default, as in the paper).
- SAC (Haarnoja et al. 2018) conditioned on z: tanh-Gaussian policy π(a|s, z) (log-likelihood
  corrected for the tanh), twin Q(s, a, z) with soft-updated targets, the temperature α tuned
  to ``target_entropy`` (or fixed), rewards scaled by ``reward_scale``; z is detached for the
  actor and the targets.
- Exploration by posterior sampling: per iteration, ``tasks_per_iteration`` training tasks
  each get ``adaptation_episodes`` episodes, the first with z ~ N(0, I), each later one with z
  sampled from the posterior on the ones before; rollouts run on ``rollout_workers`` Ray actors
  (tasks split among them, simulated batched). Every episode goes to the task's replay buffer
  (the RL batches); the encoder's context is drawn from the task's latest collection only - the
  first j of its episodes, j uniform - which is what the posterior conditions on at test time.
- Evaluation on held-out tasks: the same sequence of exploration episodes; the adapted return
  after k of them is that of an episode with the policy's mean action and z sampled from the
  posterior on those k (the prior for k = 0); ``adapted_return``: after the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ray
import torch
from torch import Tensor, nn

from metaserve.workers.engine.checkpoints import load_optimizer_tensors, optimizer_tensors
from metaserve.workers.rl.tasks import GOAL_TOLERANCE, Nav2DFamily, Task, build_rl_family
from metaserve.workers.spec import JobSpec, Nav2DSpec
from metaserve.workers.tasks.base import task_seed

OBSERVATION_SIZE = 2
ACTION_SIZE = 2
TRANSITION_SIZE = 2 * OBSERVATION_SIZE + ACTION_SIZE + 1  # (s, a, r, s')
LOG_STD_RANGE = (-20.0, 2.0)
MIN_VARIANCE = 1e-7


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PEARLAgent(nn.Module):
    """Encoder + tanh-Gaussian policy (what a meta-policy artifact holds), plain torch."""

    def __init__(self, latent_dim: int, hidden: int, max_action: float):
        super().__init__()
        self.latent_dim, self.max_action = latent_dim, max_action
        self.encoder = mlp([TRANSITION_SIZE, hidden, hidden, 2 * latent_dim])
        self.policy = mlp([OBSERVATION_SIZE + latent_dim, hidden, hidden, 2 * ACTION_SIZE])

    def posterior(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Product of Gaussian factors over a context [T, N, transition] → (μ, σ²) [T, latent]."""
        mean, raw = self.encoder(context).chunk(2, dim=-1)
        variance = nn.functional.softplus(raw).clamp_min(MIN_VARIANCE)
        posterior_variance = 1.0 / (1.0 / variance).sum(1)
        return posterior_variance * (mean / variance).sum(1), posterior_variance

    def act(self, observation: Tensor, z: Tensor, *, deterministic: bool = False,
            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Action (scaled to ±max_action) and its log-probability (tanh-corrected)."""
        mean, log_std = self.policy(torch.cat([observation, z], -1)).chunk(2, dim=-1)
        log_std = log_std.clamp(*LOG_STD_RANGE)
        noise = torch.randn(mean.shape, generator=generator) if generator is not None else torch.randn_like(mean)
        pre_tanh = mean if deterministic else mean + log_std.exp() * noise
        log_prob = (-0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std
                    - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - pre_tanh - nn.functional.softplus(-2 * pre_tanh))).sum(-1)
        return torch.tanh(pre_tanh) * self.max_action, log_prob

    @classmethod
    def from_tensors(cls, spec: JobSpec, tensors: dict[str, Tensor]) -> "PEARLAgent":
        agent = cls(spec.algorithm.latent_dim, spec.algorithm.hidden, spec.task_family.max_action)
        agent.load_state_dict(tensors)
        agent.nav = spec.task_family
        agent.adaptation_episodes = spec.algorithm.adaptation_episodes
        return agent

    @torch.no_grad()
    def sample_z(self, context: Tensor | None, tasks: int, generator: torch.Generator) -> Tensor:
        """z ~ N(0, I) without context, else z ~ q(z | context) (context [T, N, transition])."""
        if context is None:
            return torch.randn(tasks, self.latent_dim, generator=generator)
        mean, variance = self.posterior(context)
        return mean + variance.sqrt() * torch.randn(mean.shape, generator=generator)

    @torch.no_grad()
    def evaluate_tasks(self, family: Nav2DFamily, tasks: list[Task], *, seed: int,
                       episodes: int | None = None) -> list[float]:
        """Mean adapted return over ``tasks`` after 0, 1, …, ``episodes`` − 1 exploration episodes.

        Exploration episode i runs the policy's sampled actions with z from the posterior on
        episodes 0..i−1 (the prior for i = 0), as in training; the return after i of them is
        that of an evaluation episode with the policy's mean action and the same z.
        """
        goals = torch.from_numpy(np.stack([t["goal"] for t in tasks])).float()
        generator = torch.Generator().manual_seed(seed)
        count = episodes or getattr(self, "adaptation_episodes", 2)
        returns, context = [], None
        for index in range(count):
            z = self.sample_z(context, len(tasks), generator)
            evaluation = simulate_nav2d(self, family.spec, goals, z, generator, deterministic=True)
            returns.append(float(evaluation.rewards.sum(1).mean()))
            if index < count - 1:
                explored = simulate_nav2d(self, family.spec, goals, z, generator).context()
                context = explored if context is None else torch.cat([context, explored], 1)
        return returns


@dataclass
class Episodes:
    """One episode per task: [T, H, ·] arrays and the mask of steps taken."""

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    next_observations: Tensor
    dones: Tensor
    mask: Tensor

    def context(self) -> Tensor:
        """(s, a, r, s') of every step taken (steps after the end repeat the last one)."""
        transitions = torch.cat([self.observations, self.actions, self.rewards[..., None],
                                 self.next_observations], -1)
        last = self.mask.sum(1).long().clamp_min(1) - 1
        index = torch.minimum(torch.arange(self.mask.shape[1])[None, :], last[:, None])
        return torch.gather(transitions, 1, index[..., None].expand(-1, -1, TRANSITION_SIZE))


@torch.no_grad()
def simulate_nav2d(agent: PEARLAgent, nav: Nav2DSpec, goals: Tensor, z: Tensor,
                   generator: torch.Generator, *, deterministic: bool = False) -> Episodes:
    """One episode of every task at once (the dynamics of :class:`metaserve.workers.rl.tasks.Nav2DEnv`);
    ``deterministic``: the policy's mean action (evaluation), else a sampled one."""
    tasks = goals.shape[0]
    position = torch.zeros(tasks, 2)
    alive = torch.ones(tasks, dtype=torch.bool)
    trace: dict[str, list[Tensor]] = {k: [] for k in ("o", "a", "r", "n", "d", "m")}
    for _ in range(nav.horizon):
        action, _ = agent.act(position, z, deterministic=deterministic, generator=generator)
        moved = position + action.clamp(-nav.max_action, nav.max_action)
        offset = moved - goals
        reached = (offset.abs() < GOAL_TOLERANCE).all(-1)
        running = alive.float()
        for key, value in (("o", position), ("a", action), ("r", -offset.norm(dim=-1) * running),
                           ("n", moved), ("d", reached.float()), ("m", running)):
            trace[key].append(value)
        position = torch.where(alive[:, None], moved, position)
        alive = alive & ~reached
    s = {k: torch.stack(v, 1) for k, v in trace.items()}
    return Episodes(s["o"], s["a"], s["r"], s["n"], s["d"], s["m"])


class PEARLRolloutWorker:
    """A Ray actor collecting prior and posterior episodes of its share of the tasks."""

    def __init__(self, spec: dict):
        torch.set_num_threads(1)
        job = JobSpec.model_validate(spec)
        self.nav = job.task_family
        self.agent = PEARLAgent(job.algorithm.latent_dim, job.algorithm.hidden, self.nav.max_action)

    def collect(self, weights: dict[str, Tensor], goals: Tensor, seed: int,
                episodes: int) -> list[Episodes]:
        """``episodes`` episodes per task: the first with z ~ N(0, I), each later one with z
        sampled from the posterior on the ones before (sampled actions throughout)."""
        self.agent.load_state_dict(weights)
        generator = torch.Generator().manual_seed(seed)
        collected, context = [], None
        for _ in range(episodes):
            z = self.agent.sample_z(context, goals.shape[0], generator)
            collected.append(simulate_nav2d(self.agent, self.nav, goals, z, generator))
            explored = collected[-1].context()
            context = explored if context is None else torch.cat([context, explored], 1)
        return collected


class ReplayBuffer:
    """Per-task transition storage (numpy, grows)."""

    def __init__(self, tasks: int):
        self.data: list[list[Tensor]] = [[] for _ in range(tasks)]
        self.cache: list[Tensor | None] = [None] * tasks

    def add(self, task: int, episodes: Episodes, row: int) -> None:
        valid = episodes.mask[row] > 0
        rows = torch.cat([episodes.observations[row], episodes.actions[row],
                          episodes.rewards[row, :, None], episodes.next_observations[row],
                          episodes.dones[row, :, None]], -1)[valid]
        self.data[task].append(rows)
        self.cache[task] = None

    def all(self, task: int) -> Tensor:
        if self.cache[task] is None:
            self.cache[task] = torch.cat(self.data[task])
        return self.cache[task]

    def sample(self, task: int, count: int, generator: torch.Generator) -> Tensor:
        rows = self.all(task)
        return rows[torch.randint(len(rows), (count,), generator=generator)]

    def __len__(self) -> int:
        return sum(len(self.all(t)) for t in range(len(self.data)) if self.data[t])


class PEARL:
    """The PEARL algorithm object driven by :func:`metaserve.workers.rl.run_rl_job`."""

    def __init__(self, spec: JobSpec):
        self.spec, self.p = spec, spec.algorithm
        self.family = build_rl_family(spec.task_family)
        if not isinstance(self.family, Nav2DFamily):
            raise ValueError(f"pearl runs on nav2d, not {self.family.name}")
        p, nav = self.p, spec.task_family
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            self.agent = PEARLAgent(p.latent_dim, p.hidden, nav.max_action)
            critic_in = OBSERVATION_SIZE + ACTION_SIZE + p.latent_dim
            self.critics = nn.ModuleList(mlp([critic_in, p.hidden, p.hidden, 1]) for _ in range(2))
            self.reward_decoder = mlp([critic_in, p.hidden, p.hidden, 1])
        self.targets = [mlp([critic_in, p.hidden, p.hidden, 1]) for _ in range(2)]
        for target, critic in zip(self.targets, self.critics):
            target.load_state_dict(critic.state_dict())
        self.policy_optimizer = torch.optim.Adam(self.agent.policy.parameters(), lr=p.lr)
        self.log_alpha = torch.tensor(math.log(p.temperature), requires_grad=p.learn_temperature)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=p.lr)
        self.critic_optimizer = torch.optim.Adam(
            [*self.critics.parameters(), *self.agent.encoder.parameters(),
             *self.reward_decoder.parameters()], lr=p.lr)
        self.train_goals = torch.from_numpy(np.stack([
            t["goal"] for t in self.family.sample_tasks(seed=spec.seed, split="train", iteration=0,
                                                        task_indices=range(p.train_tasks))])).float()
        self.buffer = ReplayBuffer(p.train_tasks)
        # The encoder's context per task: the episodes of its latest collection under the current
        # policy, [adaptation_episodes, horizon, transition], as the encoder sees them at
        # evaluation - unlike the RL buffer (every past episode; Rakelly et al. 2019 also keep
        # the encoder's buffer apart and refresh it at each collection).
        self.contexts: list[Tensor | None] = [None] * p.train_tasks
        self.iteration = 0
        self.env_steps = 0
        self.workers: list = []

    def _workers(self) -> list:
        if not self.workers:
            spec = self.spec.model_dump(mode="json")
            actor = ray.remote(PEARLRolloutWorker).options(num_cpus=0.5, max_restarts=0)
            self.workers = [actor.remote(spec) for _ in range(self.p.rollout_workers)]
        return self.workers

    def _generator(self, iteration: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(task_seed(self.spec.seed, "train", iteration, stream))

    def collect(self) -> float:
        """Collect this iteration's episodes (see the module docstring); their mean return."""
        generator = self._generator(self.iteration, 1 << 30)
        tasks = torch.randperm(self.p.train_tasks, generator=generator)[:self.p.tasks_per_iteration]
        weights = {k: v.detach().clone() for k, v in self.agent.state_dict().items()}
        workers = self._workers()
        shards = [tasks[i::len(workers)] for i in range(len(workers))]
        calls = [(shard, worker.collect.remote(weights, self.train_goals[shard],
                                               task_seed(self.spec.seed, "train", self.iteration, i),
                                               self.p.adaptation_episodes))
                 for i, (shard, worker) in enumerate(zip(shards, workers)) if len(shard)]
        returns = []
        for shard, ref in calls:
            collected = ray.get(ref)
            for episodes in collected:
                for row, task in enumerate(shard.tolist()):
                    self.buffer.add(task, episodes, row)
                self.env_steps += int(episodes.mask.sum())
                returns.append(episodes.rewards.sum(1))
            contexts = torch.stack([episodes.context() for episodes in collected], 1)
            for row, task in enumerate(shard.tolist()):
                self.contexts[task] = contexts[row].clone()
        return float(torch.cat(returns).mean())

    def _gradient_step(self, generator: torch.Generator) -> dict[str, float]:
        p = self.p
        seen = [t for t in range(p.train_tasks) if self.buffer.data[t]]
        choice = torch.randint(len(seen), (min(self.spec.meta_batch_size, len(seen)),), generator=generator)
        tasks = [seen[i] for i in choice.tolist()]
        context = [self._context(t, generator) for t in tasks]
        batch = torch.stack([self.buffer.sample(t, p.batch_size, generator) for t in tasks])
        obs, action = batch[..., 0:2], batch[..., 2:4]
        reward, next_obs, done = batch[..., 4], batch[..., 5:7], batch[..., 7]
        z, kl = self._latent(tasks, context, generator)
        z_rows = z[:, None, :].expand(-1, p.batch_size, -1)
        alpha = self.log_alpha.detach().exp()
        with torch.no_grad():
            z_fixed = z_rows.detach()
            next_action, next_log_prob = self.agent.act(next_obs, z_fixed, generator=generator)
            target_in = torch.cat([next_obs, next_action, z_fixed], -1)
            next_q = (torch.minimum(*(t(target_in).squeeze(-1) for t in self.targets))
                      - alpha * next_log_prob)
            target = p.reward_scale * reward + p.gamma * (1 - done) * next_q
        critic_in = torch.cat([obs, action, z_rows], -1)
        critic_loss = sum(((c(critic_in).squeeze(-1) - target) ** 2).mean() for c in self.critics)
        reward_loss = torch.zeros(())
        if p.reward_loss_weight > 0:
            predicted = self.reward_decoder(critic_in).squeeze(-1)
            reward_loss = ((predicted - p.reward_scale * reward) ** 2).mean()
        self.critic_optimizer.zero_grad()
        (critic_loss + p.kl_weight * kl + p.reward_loss_weight * reward_loss).backward()
        self.critic_optimizer.step()
        z_fixed = z_rows.detach()
        new_action, log_prob = self.agent.act(obs, z_fixed, generator=generator)
        q = torch.minimum(*(c(torch.cat([obs, new_action, z_fixed], -1)).squeeze(-1) for c in self.critics))
        policy_loss = (alpha * log_prob - q).mean()
        self.policy_optimizer.zero_grad()
        policy_loss.backward()
        self.policy_optimizer.step()
        if p.learn_temperature:
            alpha_loss = -(self.log_alpha * (log_prob.detach() + p.target_entropy)).mean()
            self.alpha_optimizer.zero_grad()
            alpha_loss.backward()
            self.alpha_optimizer.step()
        with torch.no_grad():
            for target, critic in zip(self.targets, self.critics):
                for t, c in zip(target.parameters(), critic.parameters()):
                    t.mul_(1 - p.tau).add_(p.tau * c)
        return {"critic_loss": float(critic_loss.detach()), "policy_loss": float(policy_loss.detach()),
                "kl": float(kl.detach()), "reward_loss": float(reward_loss.detach()), "temperature": float(alpha),
                "entropy": -float(log_prob.detach().mean())}

    def _context(self, task: int, generator: torch.Generator) -> Tensor:
        """The first j of the task's latest episodes (j uniform in 1..adaptation_episodes − 1, as
        the posterior sees them at evaluation), ``context_size`` transitions of them at most."""
        episodes = self.contexts[task]
        count = int(torch.randint(max(1, len(episodes) - 1), (1,), generator=generator)) + 1
        context = episodes[:count].reshape(-1, TRANSITION_SIZE)
        if self.p.context_size < len(context):
            context = context[torch.randperm(len(context), generator=generator)[:self.p.context_size]]
        return context

    def _latent(self, tasks: list[int], context: list[Tensor],
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """z ~ q(z | context) per task (reparameterized) and the mean KL(q ‖ N(0, I))."""
        mean, variance = (torch.cat(parts) for parts in
                          zip(*(self.agent.posterior(c[None]) for c in context)))
        z = mean + variance.sqrt() * torch.randn(mean.shape, generator=generator)
        kl = 0.5 * (variance + mean ** 2 - 1 - variance.log()).sum(-1).mean()
        return z, kl

    def train_iteration(self) -> dict[str, float]:
        episode_return = self.collect()
        generator = self._generator(self.iteration, (1 << 30) + 1)
        losses = [self._gradient_step(generator) for _ in range(self.p.gradient_steps)]
        self.iteration += 1
        metrics = {f"train/{k}": float(np.mean([l[k] for l in losses])) for k in losses[0]}
        metrics["train/episode_return"] = episode_return
        return metrics

    def evaluate(self, split: str, *, tasks: int | None = None) -> dict[str, float]:
        """Returns of the adaptation episodes on held-out tasks (the last: adapted return)."""
        count = tasks or self.p.evaluation_tasks
        held_out = self.family.sample_tasks(seed=self.spec.seed, split=split, iteration=0,
                                            task_indices=range(count))
        returns = self.agent.evaluate_tasks(self.family, held_out, seed=self.spec.seed,
                                            episodes=self.p.adaptation_episodes)
        results = {f"{split}/return_episode{i}": value for i, value in enumerate(returns)}
        results[f"{split}/adapted_return"] = returns[-1]
        return results

    # ------------------------------------------------------------------ state

    def _modules(self) -> dict[str, nn.Module]:
        return {"agent": self.agent, "critic0": self.critics[0], "critic1": self.critics[1],
                "target0": self.targets[0], "target1": self.targets[1],
                "reward_decoder": self.reward_decoder}

    def _optimizers(self) -> tuple[tuple[str, torch.optim.Optimizer], ...]:
        return (("policy", self.policy_optimizer), ("critic", self.critic_optimizer),
                ("temperature", self.alpha_optimizer))

    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {f"{name}/{k}": v.detach().clone() for name, module in self._modules().items()
                   for k, v in module.state_dict().items()}
        tensors["temperature/log_alpha"] = self.log_alpha.detach().clone()
        for name, optimizer in self._optimizers():
            tensors.update(optimizer_tensors(optimizer, f"optimizer/{name}/"))
        for task in range(self.p.train_tasks):
            if self.buffer.data[task]:
                tensors[f"buffer/{task}"] = self.buffer.all(task).clone()
            if self.contexts[task] is not None:
                tensors[f"context/{task}"] = self.contexts[task].clone()
        return tensors, {"iteration": self.iteration, "env_steps": self.env_steps}

    def load_state(self, tensors: dict[str, Tensor], document: dict) -> None:
        for name, module in self._modules().items():
            prefix = f"{name}/"
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        with torch.no_grad():
            if "temperature/log_alpha" in tensors:
                self.log_alpha.copy_(tensors["temperature/log_alpha"])
        for name, optimizer in self._optimizers():
            load_optimizer_tensors(optimizer, tensors, f"optimizer/{name}/")
        self.buffer = ReplayBuffer(self.p.train_tasks)
        self.contexts = [None] * self.p.train_tasks
        for key, rows in tensors.items():
            if key.startswith("buffer/"):
                self.buffer.data[int(key.split("/")[1])] = [rows]
            elif key.startswith("context/"):
                self.contexts[int(key.split("/")[1])] = rows
        self.iteration = int(document["iteration"])
        self.env_steps = int(document["env_steps"])

    def meta_policy(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {k: v.detach().clone() for k, v in self.agent.state_dict().items()}
        architecture = {"kind": "pearl", "latent_dim": self.p.latent_dim, "hidden": self.p.hidden}
        recipe = {"algorithm": "pearl", "adaptation": "posterior sampling of z from context",
                  "adaptation_episodes": self.p.adaptation_episodes}
        return tensors, {"architecture": architecture, "recipe": recipe}

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
