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

import functools
import tempfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from metaserve.workers.spec import BanditSpec, HalfCheetahVelSpec, Nav2DSpec, TabularMDPSpec
from metaserve.workers.tasks.base import task_seed

Task = dict[str, np.ndarray]
GOAL_TOLERANCE = 0.01


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


class Nav2DEnv(gym.Env):
    """Observation: the position; reward −distance to the goal after the move."""

    def __init__(self, horizon: int, max_action: float):
        self.horizon, self.max_action = horizon, max_action
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-max_action, max_action, (2,), np.float32)
        self.task: Task | None = None
        self.position = np.zeros(2)
        self.steps = 0

    def set_task(self, task: Task) -> None:
        self.task = task

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position, self.steps = np.zeros(2), 0
        return self.position.astype(np.float32), {}

    def step(self, action):  # noqa: ANN001
        action = np.clip(np.asarray(action, dtype=np.float64), -self.max_action, self.max_action)
        self.position = self.position + action
        offset = self.position - self.task["goal"]
        reward = -float(np.sqrt((offset ** 2).sum()))
        self.steps += 1
        reached = bool(np.all(np.abs(offset) < GOAL_TOLERANCE))
        return (self.position.astype(np.float32), reward, reached,
                self.steps >= self.horizon and not reached, {})


CHEETAH_TOTAL_MASS = 14.0


@functools.cache
def _cheetah_xml() -> str:
    """gymnasium's half_cheetah.xml without its deprecated ``settotalmass`` compiler attribute
    (MuJoCo warns about it on every model compiled, and writes MUJOCO_LOG.TXT into the working
    directory); :class:`HalfCheetahVelEnv` applies the same total mass to the compiled model
    instead, which gives the same masses, inertias and trajectories (checked bit for bit)."""
    import gymnasium.envs.mujoco

    original = Path(gymnasium.envs.mujoco.__file__).parent / "assets" / "half_cheetah.xml"
    xml = original.read_text().replace(f' settotalmass="{CHEETAH_TOTAL_MASS:g}"', "")
    path = Path(tempfile.mkdtemp(prefix="metaserve-mujoco-")) / "half_cheetah.xml"
    path.write_text(xml)
    return str(path)


class HalfCheetahVelEnv(gym.Env):
    """HalfCheetah-v5's body and observation with the goal-velocity reward
    −|forward velocity − goal| − ``CHEETAH_CONTROL_COST`` ‖a‖²; ``horizon`` steps, no early end."""

    def __init__(self, horizon: int):
        try:
            import mujoco
            from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
        except ImportError as error:  # mujoco is a dependency; this names it if it is missing
            raise RuntimeError("task family 'halfcheetah_vel' needs MuJoCo: pip install "
                               "'mujoco>=3.1' 'imageio>=2.14'") from error
        self.cheetah = HalfCheetahEnv(xml_file=_cheetah_xml())
        mujoco.mj_setTotalmass(self.cheetah.model, CHEETAH_TOTAL_MASS)
        mujoco.mj_setConst(self.cheetah.model, self.cheetah.data)
        self.horizon = horizon
        self.observation_space = self.cheetah.observation_space
        self.action_space = self.cheetah.action_space
        self.task: Task | None = None
        self.steps = 0

    def set_task(self, task: Task) -> None:
        self.task = task

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.steps = 0
        observation, info = self.cheetah.reset(seed=seed)
        return observation.astype(np.float32), info

    def step(self, action):  # noqa: ANN001
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        observation, _, _, _, info = self.cheetah.step(action)
        velocity = float(info["x_velocity"])
        reward = -abs(velocity - float(self.task["goal"][0])) - CHEETAH_CONTROL_COST * float((action ** 2).sum())
        self.steps += 1
        return (observation.astype(np.float32), reward, False, self.steps >= self.horizon,
                {"x_velocity": velocity})

    def close(self) -> None:
        self.cheetah.close()


CHEETAH_CONTROL_COST = 0.05


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


class TrialEnv(gym.Env):
    """An RL² trial as one gymnasium episode (Duan et al. 2016, §2.2).

    ``family.trial_episodes`` episodes of one task; the observation is
    ``[obs, previous action (one-hot or vector), previous reward, done flag, elapsed fraction
    of the trial]`` so a recurrent policy can infer the task. A new task is drawn at every
    reset: trial ``j`` of stream ``s`` is task ``s`` of "iteration" ``j`` under the
    counter-based seed.
    """

    def __init__(self, family: RLTaskFamily, *, seed: int, split: str = "train", stream: int = 0):
        self.family, self.seed, self.split, self.stream = family, seed, split, stream
        self.env = family.make_env()
        self.trials = 0
        base = self.env.observation_space.shape[0]
        action_size = self.env.action_space.n if family.discrete else self.env.action_space.shape[0]
        self.action_size = action_size
        size = base + action_size + 3
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.action_space = self.env.action_space
        self.episode = 0
        self.steps = 0  # steps taken in the current trial
        self.task: Task | None = None

    def set_task(self, task: Task | None) -> None:
        """Pin the task of the following trials (None: sample one per trial again)."""
        self.task = task

    def _encode(self, observation, action, reward: float, done: bool) -> np.ndarray:  # noqa: ANN001
        previous = np.zeros(self.action_size, np.float32)
        if action is not None:
            if self.family.discrete:
                previous[int(action)] = 1.0
            else:
                previous[:] = np.asarray(action, np.float32)
        elapsed = self.steps / self.family.trial_steps
        return np.concatenate([np.asarray(observation, np.float32), previous,
                               np.array([reward, float(done), elapsed], np.float32)])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        task = self.task
        if task is None:
            task = self.family.sample_tasks(seed=self.seed, split=self.split, iteration=self.trials,
                                            task_indices=[self.stream])[0]
        rng_seed = task_seed(self.seed, self.split, self.trials, self.stream) ^ 0x5EED
        self.env.set_task(task)
        self.trials += 1
        self.episode = 0
        self.steps = 0
        observation, info = self.env.reset(seed=rng_seed)
        return self._encode(observation, None, 0.0, False), info

    def step(self, action):  # noqa: ANN001
        observation, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        done = terminated or truncated
        if done:
            self.episode += 1
            if self.episode < self.family.trial_episodes:
                observation, _ = self.env.reset()
        trial_over = done and self.episode >= self.family.trial_episodes
        return (self._encode(observation, action, reward, done), reward, trial_over, False, info)


def bandit_trial_uniforms(seed: int, split: str, trial: int, stream: int, pulls: int) -> np.ndarray:
    """The uniforms that decide the rewards of trial ``trial`` of ``stream``: pull ``t`` pays 1
    iff ``uniforms[t] < means[arm]`` (the draws :class:`TrialEnv` makes, one per pull)."""
    return np.random.default_rng(task_seed(seed, split, trial, stream) ^ 0x5EED).random(pulls)


class BanditTrialVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` bandit :class:`TrialEnv` s stepped as numpy arrays (one RLlib
    ``vector_entry_point`` env). Sub-env ``i`` is the trial stream ``first_stream + i``: it sees
    the same tasks, observations and rewards as ``TrialEnv(family, seed=seed,
    stream=first_stream + i)``. Autoreset is gymnasium's NEXT_STEP mode: the step after a
    trial ends ignores the action and returns the first observation of the next trial."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, family: BanditFamily, num_envs: int, *, seed: int, split: str = "train",
                 first_stream: int = 0):
        self.family, self.seed, self.split = family, seed, split
        self.num_envs = num_envs
        self.arms, self.pulls = family.spec.arms, family.spec.pulls
        single = TrialEnv(family, seed=seed, split=split)
        self.single_observation_space = single.observation_space
        self.single_action_space = single.action_space
        self.observation_space = gym.vector.utils.batch_space(single.observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(single.action_space, num_envs)
        self.means = np.zeros((num_envs, self.arms))
        self.uniforms = np.zeros((num_envs, self.pulls))
        self.steps = np.zeros(num_envs, np.int64)
        self.trials = np.zeros(num_envs, np.int64)
        self.pending_reset = np.zeros(num_envs, bool)
        self.set_streams(first_stream)

    def set_streams(self, first_stream: int) -> None:
        """Number the sub-envs' streams from ``first_stream`` (call before the first reset)."""
        self.streams = first_stream + np.arange(self.num_envs)

    def _new_trials(self, indices: np.ndarray) -> None:
        for i in indices:
            trial, stream = int(self.trials[i]), int(self.streams[i])
            self.means[i] = self.family.sample_tasks(seed=self.seed, split=self.split, iteration=trial,
                                                     task_indices=[stream])[0]["means"]
            self.uniforms[i] = bandit_trial_uniforms(self.seed, self.split, trial, stream, self.pulls)
        self.trials[indices] += 1
        self.steps[indices] = 0
        self.pending_reset[indices] = False

    def _observations(self, actions: np.ndarray | None, rewards: np.ndarray, done: bool) -> np.ndarray:
        observations = np.zeros((self.num_envs, self.single_observation_space.shape[0]), np.float32)
        observations[:, 0] = 1.0
        if actions is not None:
            observations[np.arange(self.num_envs), 1 + actions] = 1.0
        observations[:, 1 + self.arms] = rewards
        observations[:, 2 + self.arms] = float(done)
        observations[:, 3 + self.arms] = self.steps / self.pulls
        return observations

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._new_trials(np.arange(self.num_envs))
        return self._observations(None, np.zeros(self.num_envs), False), {}

    def step(self, actions):  # noqa: ANN001
        actions = np.asarray(actions, np.int64).reshape(self.num_envs)
        restarting = self.pending_reset.copy()
        rows = np.arange(self.num_envs)
        column = np.minimum(self.steps, self.pulls - 1)
        rewards = (self.uniforms[rows, column] < self.means[rows, actions]).astype(np.float64)
        rewards[restarting] = 0.0
        self.steps[~restarting] += 1
        observations = self._observations(actions, rewards, True)
        if restarting.any():
            self._new_trials(np.flatnonzero(restarting))
            observations[restarting] = 0.0
            observations[restarting, 0] = 1.0
        terminated = (self.steps >= self.pulls) & ~restarting
        self.pending_reset = terminated.copy()
        return observations, rewards, terminated, np.zeros(self.num_envs, bool), {}
