"""Load a meta-policy artifact (``meta_policy.safetensors`` + ``meta_policy.json``) and run it on
new tasks, in plain torch (no Ray, no RLlib, no pickle).

    policy = load_meta_policy("artifacts/")
    task = policy.sample_tasks(1, seed=7)[0]
    adapted = policy.adapt(task)                  # see below
    env = policy.make_env(task)                   # a gymnasium env of the task
    observation, _ = env.reset(seed=0)
    action = adapted.act(observation)
    policy.episode_return(task, adapted)          # one episode (RL²: one trial), its total reward
    policy.evaluate(policy.sample_tasks(100))     # averages, as the job's evaluation reports them

How each algorithm adapts (:meth:`MetaPolicy.adapt`, which returns a :class:`TaskPolicy`):

- MAML-RL: the recipe's policy-gradient steps from θ on episodes it collects in the task.
- PEARL: z sampled from the posterior q(z | context), the context being transitions
  ``[n, (s, a, r, s')]`` you pass, or the exploration episodes it collects in the task.
- RL²: nothing to compute: the recurrent policy adapts while it acts, over a trial of the
  task's episodes (``make_env`` gives one trial per episode); ``adapt``/``reset`` start a
  trial with a zero hidden state.

``policy.act`` is the meta-policy before adaptation (θ; z from the prior; RL²'s own trial).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from metaserve.workers.engine.final_artifact import META_POLICY, read_artifact
from metaserve.workers.rl.policies import expand_params
from metaserve.workers.rl.tasks import Task, build_rl_family, task_rng
from metaserve.workers.rl.trials import TrialEnv
from metaserve.workers.spec import JobSpec

HELD_OUT_ITERATION = 1 << 20  # sample_tasks draws from an iteration no job trains on


class TaskPolicy:
    """A policy for one task: ``act(observation)`` returns the action to take (a numpy array,
    or an int for discrete actions); ``reset()`` before a new episode (RL²: a new trial)."""

    def act(self, observation: Any, *, deterministic: bool = False) -> Any:
        raise NotImplementedError

    def reset(self) -> None:
        pass


class GaussianTaskPolicy(TaskPolicy):
    """MAML-RL's Gaussian MLP with one task's parameters (θ, or θ' after adaptation)."""

    def __init__(self, runner, params: dict[str, Tensor], generator: torch.Generator):  # noqa: ANN001
        self.runner, self.params, self.generator = runner, params, generator

    @torch.no_grad()
    def act(self, observation: Any, *, deterministic: bool = False) -> np.ndarray:
        observation = torch.as_tensor(np.asarray(observation), dtype=torch.float32)
        mean, log_std = functional_call(self.runner.policy, self.params, (observation,))
        action = mean if deterministic else mean + log_std.exp() * torch.randn(
            mean.shape, generator=self.generator)
        limit = self.runner.family.max_action
        return (action * self.runner.action_scale).clamp(-limit, limit).numpy()


class LatentTaskPolicy(TaskPolicy):
    """PEARL's policy π(a | s, z) with one task's z."""

    def __init__(self, agent, z: Tensor, generator: torch.Generator):  # noqa: ANN001
        self.agent, self.z, self.generator = agent, z, generator

    @torch.no_grad()
    def act(self, observation: Any, *, deterministic: bool = False) -> np.ndarray:
        observation = torch.as_tensor(np.asarray(observation), dtype=torch.float32)
        action, _ = self.agent.act(observation[None], self.z, deterministic=deterministic,
                                   generator=self.generator)
        return action[0].numpy()


class RecurrentTaskPolicy(TaskPolicy):
    """RL²'s recurrent policy over one trial: the hidden state carries what the trial taught
    it; observations are a trial env's (:class:`~metaserve.workers.rl.trials.TrialEnv`)."""

    def __init__(self, network, discrete: bool, generator: torch.Generator):  # noqa: ANN001
        self.network, self.discrete, self.generator = network, discrete, generator
        self.reset()

    def reset(self) -> None:
        self.state = self.network.initial_state(1)

    @torch.no_grad()
    def act(self, observation: Any, *, deterministic: bool = False) -> Any:
        observation = torch.as_tensor(np.asarray(observation), dtype=torch.float32)
        outputs, _, self.state = self.network(observation.reshape(1, 1, -1), self.state)
        outputs = outputs[0, 0]
        if self.discrete:
            if deterministic:
                return int(outputs.argmax())
            return int(torch.multinomial(torch.softmax(outputs, -1), 1, generator=self.generator))
        mean, log_std = outputs.chunk(2, dim=-1)
        noise = 0.0 if deterministic else log_std.exp() * torch.randn(mean.shape, generator=self.generator)
        return (mean + noise).numpy()


class MetaPolicy:
    """A loaded meta-policy (see the module docstring)."""

    def __init__(self, tensors: dict[str, Tensor], document: dict):
        self.document = document
        self.recipe = document["recipe"]
        self.architecture = document["architecture"]
        self.algorithm = self.recipe["algorithm"]
        self.spec = JobSpec.model_validate(document["spec"])
        self.family = build_rl_family(self.spec.task_family)
        if self.algorithm == "maml":
            from metaserve.workers.rl.maml_rl import MAMLRL

            self.runner = MAMLRL(self.spec)
            with torch.no_grad():
                for name, value in self.runner.params.items():
                    value.copy_(tensors[name])
        elif self.algorithm == "rl2":
            from metaserve.workers.rl.rl2_policy import rl2_network

            self.runner = rl2_network(self.family, self.architecture["hidden_size"])
            self.runner.load_state_dict(tensors)
        elif self.algorithm == "pearl":
            from metaserve.workers.rl.pearl_agent import PEARLAgent

            self.runner = PEARLAgent.from_tensors(self.spec, tensors)
        else:
            raise ValueError(f"unknown meta-policy algorithm {self.algorithm!r}")
        self._unadapted: TaskPolicy | None = None

    # ------------------------------------------------------------------ tasks

    def sample_tasks(self, count: int, *, seed: int = 0) -> list[Task]:
        """``count`` new tasks of the policy's family (independent of the training tasks)."""
        return [self.family.sample_task(task_rng(seed, "test", HELD_OUT_ITERATION, index))
                for index in range(count)]

    def make_env(self, task: Task, *, seed: int = 0) -> gym.Env:
        """A gymnasium env of ``task``: for RL², a trial env (one episode = a trial of the
        task's episodes, observations carrying the previous action and reward)."""
        if self.algorithm == "rl2":
            env = TrialEnv(self.family, seed=seed, split="test")
        else:
            env = self.family.make_env()
        env.set_task(task)
        return env

    # ------------------------------------------------------------------ acting and adapting

    def adapt(self, task: Task | None = None, *, context: Any = None, seed: int = 0,
              steps: int | None = None) -> TaskPolicy:
        """A policy adapted to ``task`` (see the module docstring); ``steps``: MAML-RL's
        policy-gradient steps (default: the recipe's); ``context``: PEARL's transitions
        ``[n, 2·obs + act + 1]`` instead of exploring ``task``."""
        generator = torch.Generator().manual_seed(seed)
        if self.algorithm == "rl2":
            return RecurrentTaskPolicy(self.runner, self.family.discrete, generator)
        if self.algorithm == "pearl":
            return LatentTaskPolicy(self.runner, self._pearl_posterior(task, context, generator),
                                    generator)
        if task is None:
            raise ValueError("MAML-RL adapts on episodes of a task: pass the task")
        goals = torch.as_tensor(np.asarray(task["goal"]), dtype=torch.float32)[None]
        params = expand_params({k: v.detach() for k, v in self.runner.params.items()}, 1)
        for step in range(self.recipe["inner_steps"] if steps is None else steps):
            data = self.runner.rollout(params, goals, self.recipe["episodes_per_task"], generator)
            params = self.runner.adapt(params, data, create_graph=False, step=step)
        return GaussianTaskPolicy(self.runner, {k: v[0].detach() for k, v in params.items()},
                                  generator)

    def _pearl_posterior(self, task: Task | None, context: Any,
                         generator: torch.Generator) -> Tensor:
        from metaserve.workers.rl.pearl_agent import TRANSITION_SIZE, play_episodes

        if context is not None:
            context = torch.as_tensor(np.asarray(context), dtype=torch.float32).reshape(1, -1, TRANSITION_SIZE)
        elif task is not None:  # the exploration episodes of the job's evaluation
            goals = torch.as_tensor(np.asarray(task["goal"]), dtype=torch.float32)[None]
            for _ in range(self.recipe["adaptation_episodes"] - 1):
                z = self.runner.sample_z(context, 1, generator)
                explored = play_episodes(self.runner, self.spec.task_family, goals, z, generator).transitions()
                context = explored if context is None else torch.cat([context, explored], 1)
        return self.runner.sample_z(context, 1, generator)

    def act(self, observation: Any, *, deterministic: bool = False) -> Any:
        """The meta-policy's action before adaptation (see the module docstring)."""
        if self._unadapted is None:
            self._unadapted = self._before_adaptation()
        return self._unadapted.act(observation, deterministic=deterministic)

    def reset(self) -> None:
        """Start a new episode of :meth:`act` (RL²: a new trial; PEARL: a new prior z)."""
        self._unadapted = None

    def _before_adaptation(self, seed: int = 0) -> TaskPolicy:
        if self.algorithm == "maml":
            return GaussianTaskPolicy(self.runner, {k: v.detach() for k, v in self.runner.params.items()},
                                      torch.Generator().manual_seed(seed))
        return self.adapt(None, seed=seed)

    def episode_return(self, task: Task, actor: TaskPolicy | None = None, *, seed: int = 0,
                       deterministic: bool = False) -> float:
        """Total reward of one episode of ``task`` (RL²: one trial) played by ``actor``
        (default: the meta-policy before adaptation)."""
        env = self.make_env(task, seed=seed)
        actor = actor or self._before_adaptation(seed)
        actor.reset()
        observation, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            observation, reward, terminated, truncated, _ = env.step(
                actor.act(observation, deterministic=deterministic))
            total += float(reward)
            done = terminated or truncated
        env.close()
        return total

    # ------------------------------------------------------------------ batched evaluation

    def evaluate(self, tasks: list[Task], *, seed: int = 0, inner_steps: list[int] | None = None
                 ) -> dict[str, float]:
        """Average return on ``tasks`` after adapting to each (see the module docstring)."""
        if self.algorithm == "maml":
            goals = torch.from_numpy(np.stack([t["goal"] for t in tasks])).float()
            return self.runner.evaluate_goals(goals, inner_steps or [self.recipe["inner_steps"]],
                                              seed=seed)
        if self.algorithm == "rl2":
            from metaserve.workers.rl.rl2_policy import run_rl2_trials

            totals = run_rl2_trials(self.runner, self.family, tasks, seed=seed)
            return {"trial_return": float(totals.mean())}
        returns = self.runner.evaluate_tasks(self.family, tasks, seed=seed)
        return {f"return_episode{i}": float(v) for i, v in enumerate(returns)}


def load_meta_policy(directory: Path | str) -> MetaPolicy:
    """The meta-policy stored in ``directory`` (as written by a meta-RL job, or downloaded by
    ``metaserve fetch``)."""
    tensors, document = read_artifact(Path(directory), META_POLICY)
    return MetaPolicy(tensors, document)
