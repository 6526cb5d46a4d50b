"""Meta-RL task families as gymnasium environments.

Each family samples tasks from the counter-based seed of :mod:`metaserve.workers.tasks.base` (task
``t`` of iteration ``i`` on split ``s`` depends only on ``(seed, s, i, t)``) and builds an
environment whose task is switched with ``set_task``:

- ``bandit``: k-armed Bernoulli bandits, arm means ~ U[0, 1] (Duan et al. 2016, §4.1). One
  episode is one pull; a trial is ``pulls`` episodes.
- ``tabular_mdp``: random MDPs (Duan et al. 2016, §4.2): transitions ~ Dirichlet(1), mean
  rewards ~ N(1, 1), rewards ~ N(mean, 1), episodes of ``horizon`` steps from state 0.
- ``nav2d``: point robot from the origin to a goal ~ U[−0.5, 0.5]², reward −‖x − goal‖,
  actions clipped to ±``max_action``, the episode ends within 0.01 of the goal on both axes
  or after ``horizon`` steps (Finn et al. 2017, §5.3, as in their rllab code).
- ``halfcheetah_vel``: MuJoCo's half-cheetah (gymnasium's HalfCheetah-v5 model) rewarded for
  running at a goal velocity ~ U[0, 2]: −|v − goal| − 0.05 ‖a‖² (Finn et al. 2017, §5.3).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from metaserve.workers.rl.halfcheetah import HalfCheetahVelEnv
from metaserve.workers.rl.nav2d import Nav2DEnv
from metaserve.workers.spec import BanditSpec, HalfCheetahVelSpec, Nav2DSpec, TabularMDPSpec
from metaserve.workers.tasks.base import task_seed

Task = dict[str, np.ndarray]


def task_rng(seed: int, split: str, iteration: int, task_index: int) -> np.random.Generator:
    """A numpy generator seeded by :func:`metaserve.workers.tasks.base.task_seed`."""
    return np.random.default_rng(task_seed(seed, split, iteration, task_index))


class BanditEnv(gym.Env):
    """One pull per episode: observation a constant 1, reward ~ Bernoulli(means[action])."""

    def __init__(self, arms: int):
        self.arms = arms
        self.observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(arms)
        self.task: Task | None = None

    def set_task(self, task: Task) -> None:
        self.task = task

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return np.ones(1, np.float32), {}

    def step(self, action: int):
        reward = float(self.np_random.random() < self.task["means"][int(action)])
        return np.ones(1, np.float32), reward, True, False, {}


class TabularMDPEnv(gym.Env):
    """Observation: the one-hot state; reward ~ N(mean_rewards[s, a], 1); fixed horizon."""

    def __init__(self, states: int, actions: int, horizon: int):
        self.states, self.actions, self.horizon = states, actions, horizon
        self.observation_space = gym.spaces.Box(0.0, 1.0, (states,), np.float32)
        self.action_space = gym.spaces.Discrete(actions)
        self.task: Task | None = None
        self.state = 0
        self.steps = 0

    def set_task(self, task: Task) -> None:
        self.task = task

    def _observation(self) -> np.ndarray:
        observation = np.zeros(self.states, np.float32)
        observation[self.state] = 1.0
        return observation

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.state, self.steps = 0, 0
        return self._observation(), {}

    def step(self, action: int):
        action = int(action)
        reward = float(self.task["mean_rewards"][self.state, action] + self.np_random.normal())
        self.state = int(self.np_random.choice(self.states,
                                               p=self.task["transitions"][self.state, action]))
        self.steps += 1
        return self._observation(), reward, False, self.steps >= self.horizon, {}


class RLTaskFamily:
    """What every RL family provides: ``sample_tasks``, ``make_env``, and the trial length."""

    name: str
    trial_episodes: int  # episodes of one task in an RL² trial
    max_episode_steps: int
    discrete: bool

    def sample_task(self, rng: np.random.Generator) -> Task:
        raise NotImplementedError

    def make_env(self) -> gym.Env:
        raise NotImplementedError

    def sample_tasks(self, *, seed: int, split: str, iteration: int,
                     task_indices: list[int] | range) -> list[Task]:
        """The tasks ``task_indices`` of ``iteration`` (counter-based, see module docstring)."""
        return [self.sample_task(task_rng(seed, split, iteration, index)) for index in task_indices]

    @property
    def trial_steps(self) -> int:
        return self.trial_episodes * self.max_episode_steps


class BanditFamily(RLTaskFamily):
    name = "bandit"
    discrete = True
    max_episode_steps = 1

    def __init__(self, spec: BanditSpec):
        self.spec = spec
        self.trial_episodes = spec.pulls

    def sample_task(self, rng: np.random.Generator) -> Task:
        return {"means": rng.uniform(0.0, 1.0, self.spec.arms)}

    def make_env(self) -> BanditEnv:
        return BanditEnv(self.spec.arms)


class TabularMDPFamily(RLTaskFamily):
    name = "tabular_mdp"
    discrete = True

    def __init__(self, spec: TabularMDPSpec):
        self.spec = spec
        self.trial_episodes = spec.episodes
        self.max_episode_steps = spec.horizon

    def sample_task(self, rng: np.random.Generator) -> Task:
        s, a = self.spec.states, self.spec.actions
        return {"transitions": rng.dirichlet(np.ones(s), size=(s, a)),
                "mean_rewards": rng.normal(1.0, 1.0, size=(s, a))}

    def make_env(self) -> TabularMDPEnv:
        return TabularMDPEnv(self.spec.states, self.spec.actions, self.spec.horizon)


class Nav2DFamily(RLTaskFamily):
    name = "nav2d"
    discrete = False
    observation_size = 2
    action_size = 2

    def __init__(self, spec: Nav2DSpec):
        self.spec = spec
        self.trial_episodes = spec.episodes
        self.max_episode_steps = spec.horizon

    def sample_task(self, rng: np.random.Generator) -> Task:
        low, high = self.spec.goal_range
        return {"goal": rng.uniform(low, high, 2)}

    @property
    def max_action(self) -> float:
        return self.spec.max_action

    def make_env(self) -> Nav2DEnv:
        return Nav2DEnv(self.spec.horizon, self.spec.max_action)


class HalfCheetahVelFamily(RLTaskFamily):
    name = "halfcheetah_vel"
    discrete = False
    observation_size = 17
    action_size = 6
    max_action = 1.0

    def __init__(self, spec: HalfCheetahVelSpec):
        self.spec = spec
        self.trial_episodes = spec.episodes
        self.max_episode_steps = spec.horizon

    def sample_task(self, rng: np.random.Generator) -> Task:
        low, high = self.spec.velocity_range
        return {"goal": rng.uniform(low, high, 1)}

    def make_env(self) -> HalfCheetahVelEnv:
        return HalfCheetahVelEnv(self.spec.horizon)


RL_FAMILY_CLASSES: dict[str, type[RLTaskFamily]] = {
    "bandit": BanditFamily, "tabular_mdp": TabularMDPFamily, "nav2d": Nav2DFamily,
    "halfcheetah_vel": HalfCheetahVelFamily}


def build_rl_family(spec: Any) -> RLTaskFamily:
    """The family of a validated task-family spec (``BanditSpec``, ...)."""
    return RL_FAMILY_CLASSES[spec.name](spec)


