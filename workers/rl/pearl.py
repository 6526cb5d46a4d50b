"""PEARL (Rakelly et al. 2019) on ``nav2d``: probabilistic embeddings for off-policy meta-RL.
This module holds the algorithm (collection, contexts, the latent and its KL, the state); the
agent is :mod:`~metaserve.workers.rl.pearl_agent`, the SAC step :mod:`~metaserve.workers.rl.sac`,
the replay :mod:`~metaserve.workers.rl.replay`.

- Context encoder q(z|c): an MLP maps each transition (s, a, r, s') to a Gaussian factor
  N(μ_i, σ_i²); the posterior is their product (σ² = 1/Σ σ_i⁻², μ = σ² Σ μ_i/σ_i²), trained by
  the critic's loss plus ``kl_weight`` · mean_tasks KL(q(z|c) ‖ N(0, I)) (a weight per task,
  so its meaning does not change with ``meta_batch_size``; the reference implementation sums
  over the meta-batch, so its λ is ``kl_weight / meta_batch_size`` here; plus, if
  ``reward_loss_weight``, a decoder's reward-prediction loss; 0 by default, as in the paper).
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

import numpy as np
import ray
import torch
from torch import Tensor, nn

from metaserve.workers.engine.checkpoints import load_optimizer_tensors, optimizer_tensors
from metaserve.workers.rl.nav2d import Nav2DEpisodes
from metaserve.workers.rl.pearl_agent import (ACTION_SIZE, OBSERVATION_SIZE, TRANSITION_SIZE, PEARLAgent,
                                              play_episodes, probe_r2)
from metaserve.workers.rl.replay import ReplayBuffer, Transitions
from metaserve.workers.rl.sac import SAC
from metaserve.workers.rl.tasks import Nav2DFamily, build_rl_family
from metaserve.workers.spec import JobSpec
from metaserve.workers.tasks.base import task_seed

PROBE_FOLDS = 5  # cross-fitting folds of the encoder probe


class PEARLRolloutWorker:
    """A Ray actor collecting prior and posterior episodes of its share of the tasks."""

    def __init__(self, spec: JobSpec):
        torch.set_num_threads(1)
        self.nav = spec.task_family
        self.agent = PEARLAgent(spec.algorithm.latent_dim, spec.algorithm.hidden, self.nav.max_action)

    def collect(self, weights: dict[str, Tensor], goals: Tensor, seed: int,
                episodes: int) -> list[Nav2DEpisodes]:
        """``episodes`` episodes per task: the first with z ~ N(0, I), each later one with z
        sampled from the posterior on the ones before (sampled actions throughout)."""
        self.agent.load_state_dict(weights)
        generator = torch.Generator().manual_seed(seed)
        collected, context = [], None
        for _ in range(episodes):
            z = self.agent.sample_z(context, goals.shape[0], generator)
            collected.append(play_episodes(self.agent, self.nav, goals, z, generator))
            explored = collected[-1].transitions()
            context = explored if context is None else torch.cat([context, explored], 1)
        return collected


class PEARL:
    """The PEARL algorithm (see the module docstring; driven by :class:`~metaserve.workers.rl.driver.RLDriver`)."""

    def __init__(self, spec: JobSpec):
        self.spec, self.config = spec, spec.algorithm
        self.family = build_rl_family(spec.task_family)
        if not isinstance(self.family, Nav2DFamily):
            raise ValueError(f"pearl runs on nav2d, not {self.family.name}")
        config, nav = self.config, spec.task_family
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            self.agent = PEARLAgent(config.latent_dim, config.hidden, nav.max_action)
            self.sac = SAC(self.agent, config)
        self.train_goals = torch.from_numpy(np.stack([
            t["goal"] for t in self.family.sample_tasks(seed=spec.seed, split="train", iteration=0,
                                                        task_indices=range(config.train_tasks))])).float()
        self.buffer = ReplayBuffer(config.train_tasks)
        # The encoder's context per task: the episodes of its latest collection under the current
        # policy, [adaptation_episodes, horizon, transition], as the encoder sees them at
        # evaluation - unlike the RL buffer (every past episode; Rakelly et al. 2019 also keep
        # the encoder's buffer apart and refresh it at each collection).
        self.contexts: list[Tensor | None] = [None] * config.train_tasks
        self.iteration = 0
        self.env_steps = 0
        self.workers: list = []

    def _workers(self) -> list:
        if not self.workers:
            actor = ray.remote(PEARLRolloutWorker).options(num_cpus=0.5, max_restarts=0)
            self.workers = [actor.remote(self.spec) for _ in range(self.config.rollout_workers)]
        return self.workers

    def _generator(self, iteration: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(task_seed(self.spec.seed, "train", iteration, stream))

    def collect(self) -> float:
        """Collect this iteration's episodes (see the module docstring); their mean return."""
        generator = self._generator(self.iteration, 1 << 30)
        tasks = torch.randperm(self.config.train_tasks, generator=generator)[:self.config.tasks_per_iteration]
        weights = {k: v.detach().clone() for k, v in self.agent.state_dict().items()}
        workers = self._workers()
        shards = [tasks[i::len(workers)] for i in range(len(workers))]
        calls = [(shard, worker.collect.remote(weights, self.train_goals[shard],
                                               task_seed(self.spec.seed, "train", self.iteration, i),
                                               self.config.adaptation_episodes))
                 for i, (shard, worker) in enumerate(zip(shards, workers)) if len(shard)]
        returns = []
        for shard, ref in calls:
            collected = ray.get(ref)
            for episodes in collected:
                for row, task in enumerate(shard.tolist()):
                    self.buffer.add(task, episodes, row)
                self.env_steps += int(episodes.mask.sum())
                returns.append(episodes.rewards.sum(1))
            contexts = torch.stack([episodes.transitions() for episodes in collected], 1)
            for row, task in enumerate(shard.tolist()):
                self.contexts[task] = contexts[row].clone()
        return float(torch.cat(returns).mean())

    def _gradient_step(self, generator: torch.Generator) -> dict[str, float]:
        """One SAC step on ``meta_batch_size`` tasks drawn from those with data: per task a
        context (for z) and ``batch_size`` replayed transitions."""
        config = self.config
        seen = [t for t in range(config.train_tasks) if self.buffer.data[t]]
        choice = torch.randint(len(seen), (min(self.spec.meta_batch_size, len(seen)),), generator=generator)
        tasks = [seen[i] for i in choice.tolist()]
        context = [self._context(t, generator) for t in tasks]
        rows = torch.stack([self.buffer.sample(t, config.batch_size, generator) for t in tasks])
        batch = Transitions.from_rows(rows, OBSERVATION_SIZE, ACTION_SIZE)
        z, kl = self._latent(tasks, context, generator)
        return self.sac.step(batch, z[:, None, :].expand(-1, config.batch_size, -1), kl, generator)

    def _context(self, task: int, generator: torch.Generator) -> Tensor:
        """The first j of the task's latest episodes (j uniform in 1..adaptation_episodes − 1, as
        the posterior sees them at evaluation), ``context_size`` transitions of them at most."""
        episodes = self.contexts[task]
        count = int(torch.randint(max(1, len(episodes) - 1), (1,), generator=generator)) + 1
        context = episodes[:count].reshape(-1, TRANSITION_SIZE)
        if self.config.context_size < len(context):
            context = context[torch.randperm(len(context), generator=generator)[:self.config.context_size]]
        return context

    def _latent(self, tasks: list[int], context: list[Tensor],
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """z ~ q(z | context) per task (reparameterized) and KL(q(z | c_t) ‖ N(0, I)) averaged
        over the tasks t of the meta-batch, as the critic's loss is a mean over the tasks'
        transitions: ``kl_weight`` is a weight per task, independent of ``meta_batch_size``
        (rlkit's ``PEARLAgent.compute_kl_div`` sums over the tasks instead, so its ``kl_lambda``
        is ``kl_weight / meta_batch_size``; docs/notes/rl-contract.md)."""
        mean, variance = (torch.cat(parts) for parts in
                          zip(*(self.agent.posterior(c[None]) for c in context)))
        z = mean + variance.sqrt() * torch.randn(mean.shape, generator=generator)
        kl = 0.5 * (variance + mean ** 2 - 1 - variance.log()).sum(-1).mean()
        return z, kl

    def train_iteration(self) -> dict[str, float]:
        episode_return = self.collect()
        generator = self._generator(self.iteration, (1 << 30) + 1)
        losses = [self._gradient_step(generator) for _ in range(self.config.gradient_steps)]
        self.iteration += 1
        metrics = {f"train/{name}": float(np.mean([step[name] for step in losses])) for name in losses[0]}
        metrics["train/episode_return"] = episode_return
        return metrics

    def evaluate(self, split: str, *, tasks: int | None = None) -> dict[str, float]:
        """Returns of the adaptation episodes on held-out tasks (the last: adapted return), each
        with its 95 % CI half-width over the tasks, and the encoder probe after k ≥ 1
        exploration episodes: the cross-fitted R² of a linear map from the posterior mean to
        the goal (``probe_r2``; about 0 when the posterior carries no goal information); and
        the control ``return_episode{k}_other_task``: z from the posterior of another task's k
        episodes (equal to ``return_episode{k}`` when the posterior carries no goal information
        the policy uses)."""
        returns, results = self.adaptation_returns(split, tasks=tasks)
        return results

    def adaptation_returns(self, split: str, *, tasks: int | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """Per-task returns [episodes, tasks] of :meth:`evaluate` and its summary."""
        count = tasks or self.config.evaluation_tasks
        held_out = self.family.sample_tasks(seed=self.spec.seed, split=split, iteration=0,
                                            task_indices=range(count))
        controls: list[Tensor] = []
        returns, means = self.agent.adaptation(self.family, held_out, seed=self.spec.seed,
                                               episodes=self.config.adaptation_episodes, controls=controls)
        returns = returns.numpy()
        goals = np.stack([t["goal"] for t in held_out])
        results = {}
        for i, values in enumerate(returns):
            results[f"{split}/return_episode{i}"] = float(values.mean())
            results[f"{split}/return_episode{i}_ci95"] = float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))
        for k, control in enumerate(controls, start=1):  # z from another task's posterior
            results[f"{split}/return_episode{k}_other_task"] = float(control.mean())
        if count >= PROBE_FOLDS * (self.config.latent_dim + 2):  # enough goals to fit every fold
            for k, mean in enumerate(means, start=1):
                results[f"{split}/probe_r2_episode{k}"] = probe_r2(mean.numpy(), goals, folds=PROBE_FOLDS)
        results[f"{split}/adapted_return"] = results[f"{split}/return_episode{len(returns) - 1}"]
        return returns, results

    # ------------------------------------------------------------------ state

    def _modules(self) -> dict[str, nn.Module]:
        return {"agent": self.agent, **self.sac.modules()}

    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {f"{name}/{k}": v.detach().clone() for name, module in self._modules().items()
                   for k, v in module.state_dict().items()}
        tensors["temperature/log_alpha"] = self.sac.log_alpha.detach().clone()
        for name, optimizer in self.sac.optimizers():
            tensors.update(optimizer_tensors(optimizer, f"optimizer/{name}/"))
        for task in range(self.config.train_tasks):
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
                self.sac.log_alpha.copy_(tensors["temperature/log_alpha"])
        for name, optimizer in self.sac.optimizers():
            load_optimizer_tensors(optimizer, tensors, f"optimizer/{name}/")
        self.buffer = ReplayBuffer(self.config.train_tasks)
        self.contexts = [None] * self.config.train_tasks
        for key, rows in tensors.items():
            if key.startswith("buffer/"):
                self.buffer.data[int(key.split("/")[1])] = [rows]
            elif key.startswith("context/"):
                self.contexts[int(key.split("/")[1])] = rows
        self.iteration = int(document["iteration"])
        self.env_steps = int(document["env_steps"])

    def meta_policy(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {k: v.detach().clone() for k, v in self.agent.state_dict().items()}
        architecture = {"kind": "pearl", "latent_dim": self.config.latent_dim, "hidden": self.config.hidden}
        recipe = {"algorithm": "pearl", "adaptation": "posterior sampling of z from context",
                  "adaptation_episodes": self.config.adaptation_episodes}
        return tensors, {"architecture": architecture, "recipe": recipe}

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
