"""RL²'s trials (Duan et al. 2016, §2.2): :class:`TrialEnv` plays ``family.trial_episodes``
episodes of one task as one gymnasium episode, and :class:`BanditTrialVectorEnv` steps many
bandit trials as numpy arrays (one RLlib ``vector_entry_point`` env)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from metaserve.workers.rl.tasks import BanditFamily, RLTaskFamily, Task
from metaserve.workers.tasks.base import task_seed

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
