"""RL task families: counter-based tasks, environment dynamics, and the RL² trial wrapper."""

from __future__ import annotations

import numpy as np
import pytest

from metaserve.workers.rl.halfcheetah import CHEETAH_CONTROL_COST
from metaserve.workers.rl.tasks import BanditFamily, HalfCheetahVelFamily, Nav2DFamily, TabularMDPFamily
from metaserve.workers.rl.trials import BanditTrialVectorEnv, TrialEnv
from metaserve.workers.spec import BanditSpec, HalfCheetahVelSpec, Nav2DSpec, TabularMDPSpec


def test_tasks_depend_only_on_seed_split_iteration_and_index():
    family = TabularMDPFamily(TabularMDPSpec())
    a = family.sample_tasks(seed=3, split="train", iteration=7, task_indices=[0, 1, 2])
    b = family.sample_tasks(seed=3, split="train", iteration=7, task_indices=[2])
    assert np.array_equal(a[2]["transitions"], b[0]["transitions"])
    other = family.sample_tasks(seed=3, split="val", iteration=7, task_indices=[2])
    assert not np.array_equal(a[2]["mean_rewards"], other[0]["mean_rewards"])


def test_tabular_mdp_tasks_are_dirichlet_transitions_and_gaussian_rewards():
    task = TabularMDPFamily(TabularMDPSpec(states=10, actions=5)).sample_tasks(
        seed=0, split="train", iteration=0, task_indices=[0])[0]
    assert task["transitions"].shape == (10, 5, 10)
    assert np.allclose(task["transitions"].sum(-1), 1.0)
    assert task["mean_rewards"].shape == (10, 5)


def test_bandit_pays_bernoulli_rewards_with_the_arm_means():
    env = BanditFamily(BanditSpec(arms=3)).make_env()
    env.set_task({"means": np.array([0.0, 1.0, 0.5])})
    env.reset(seed=0)
    assert [env.step(1)[1:3] for _ in range(3)] == [(1.0, True)] * 3
    assert [env.step(0)[1] for _ in range(3)] == [0.0] * 3


def test_nav2d_clips_actions_rewards_minus_distance_and_ends_at_the_goal():
    env = Nav2DFamily(Nav2DSpec()).make_env()
    env.set_task({"goal": np.array([0.3, 0.0])})
    observation, _ = env.reset(seed=0)
    assert observation.tolist() == [0.0, 0.0]
    observation, reward, terminated, truncated, _ = env.step(np.array([5.0, 0.0]))
    assert np.allclose(observation, [0.1, 0.0]) and reward == pytest.approx(-0.2)
    assert (terminated, truncated) == (False, False)
    env.step(np.array([0.1, 0.0]))
    _, reward, terminated, _, _ = env.step(np.array([0.1, 0.0]))
    assert terminated and reward == pytest.approx(0.0, abs=1e-9)


def test_halfcheetah_vel_rewards_the_velocity_error_and_the_control_cost_in_mujoco():
    family = HalfCheetahVelFamily(HalfCheetahVelSpec(horizon=5))
    tasks = family.sample_tasks(seed=3, split="train", iteration=0, task_indices=range(200))
    goals = np.array([task["goal"][0] for task in tasks])
    assert goals.min() >= 0.0 and goals.max() <= 2.0 and goals.std() > 0.4
    env = family.make_env()
    assert env.cheetah.model.body_mass.sum() == pytest.approx(14.0)  # HalfCheetah-v5's total
    env.set_task({"goal": np.array([1.5])})
    observation, _ = env.reset(seed=0)
    assert observation.shape == (17,) == env.observation_space.shape and env.action_space.shape == (6,)
    position = env.cheetah.data.qpos[0]
    action = np.array([0.5, -0.5, 0.2, 0.0, 1.0, -1.0])
    flags = []
    for _ in range(5):
        _, reward, terminated, truncated, info = env.step(action)
        velocity = info["x_velocity"]
        assert reward == pytest.approx(-abs(velocity - 1.5) - CHEETAH_CONTROL_COST * (action ** 2).sum())
        flags.append((terminated, truncated))
    assert flags[-1] == (False, True) and not any(t or u for t, u in flags[:-1])
    # the velocity is MuJoCo's: displacement of the root over the control step (dt = 0.05 s)
    moved = env.cheetah.data.qpos[0] - position
    assert moved != 0.0
    env.reset(seed=0)
    replay = [env.step(action)[1] for _ in range(5)]
    env.reset(seed=0)
    assert replay == [env.step(action)[1] for _ in range(5)]


def test_halfcheetah_body_equals_gymnasiums_without_its_deprecated_mass_attribute(tmp_path, monkeypatch):
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

    monkeypatch.chdir(tmp_path)  # the stock model's warning writes MUJOCO_LOG.TXT here
    stock = HalfCheetahEnv()
    ours = HalfCheetahVelFamily(HalfCheetahVelSpec()).make_env()
    ours.set_task({"goal": np.array([1.0])})
    assert np.array_equal(stock.model.body_mass, ours.cheetah.model.body_mass)
    assert np.array_equal(stock.model.body_inertia, ours.cheetah.model.body_inertia)
    first, _ = stock.reset(seed=4)
    assert np.array_equal(first.astype(np.float32), ours.reset(seed=4)[0])
    for action in np.random.default_rng(0).uniform(-1, 1, (20, 6)):
        assert np.array_equal(stock.step(action)[0].astype(np.float32), ours.step(action)[0])


def test_nav2d_truncates_at_the_horizon():
    env = Nav2DFamily(Nav2DSpec(horizon=3)).make_env()
    env.set_task({"goal": np.array([0.5, 0.5])})
    env.reset(seed=0)
    flags = [env.step(np.zeros(2))[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


def test_trial_env_chains_episodes_of_one_task_and_feeds_previous_action_and_reward():
    family = BanditFamily(BanditSpec(arms=2, pulls=3))
    env = TrialEnv(family, seed=0)
    env.set_task({"means": np.array([1.0, 0.0])})
    observation, _ = env.reset()
    # obs, one-hot action, reward, done, elapsed fraction of the trial
    assert observation.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    steps = [env.step(0) for _ in range(3)]
    assert [s[0].tolist() for s in steps] == [[1.0, 1.0, 0.0, 1.0, 1.0, float(np.float32(t / 3))] for t in (1, 2, 3)]
    assert [s[2] for s in steps] == [False, False, True]


def test_trial_env_draws_a_new_counter_based_task_per_trial():
    family = BanditFamily(BanditSpec())
    env = TrialEnv(family, seed=5, stream=4)
    env.reset()
    first = env.env.task["means"].copy()
    env.reset()
    expected = family.sample_tasks(seed=5, split="train", iteration=1, task_indices=[4])[0]
    assert not np.array_equal(first, env.env.task["means"])
    assert np.array_equal(env.env.task["means"], expected["means"])


def test_bandit_vector_env_replays_the_single_trial_envs_of_its_streams():
    """Same seed and stream: same tasks, observations, rewards and trial ends as TrialEnv,
    across trials (NEXT_STEP autoreset: the step after a trial's end starts the next one)."""
    family = BanditFamily(BanditSpec(arms=4, pulls=3))
    vector = BanditTrialVectorEnv(family, 3, seed=7, first_stream=5)
    singles = [TrialEnv(family, seed=7, stream=5 + index) for index in range(3)]
    observations, _ = vector.reset()
    assert np.array_equal(observations, np.stack([env.reset()[0] for env in singles]))
    actions_rng = np.random.default_rng(0)
    total = 0.0
    for step in range(4 * 4):
        actions = actions_rng.integers(4, size=3)
        observations, rewards, terminated, truncated, _ = vector.step(actions)
        assert not truncated.any()
        if step % 4 == 3:  # autoreset step: action ignored, first observation of the next trial
            assert np.array_equal(observations, np.stack([env.reset()[0] for env in singles]))
            assert not terminated.any() and not rewards.any()
            continue
        results = [env.step(int(action)) for env, action in zip(singles, actions)]
        assert np.array_equal(observations, np.stack([r[0] for r in results]))
        assert rewards.tolist() == [r[1] for r in results]
        assert terminated.tolist() == [r[2] for r in results]
        total += rewards.sum()
    assert 0 < total < 36  # the rewards are not degenerate
    assert vector.trials.tolist() == [5, 5, 5]


def test_bandit_vector_env_streams_are_renumbered_before_the_first_reset():
    family = BanditFamily(BanditSpec(arms=3, pulls=2))
    vector = BanditTrialVectorEnv(family, 2, seed=1)
    vector.set_streams(1_000_000)
    vector.reset()
    expected = family.sample_tasks(seed=1, split="train", iteration=0,
                                   task_indices=[1_000_000, 1_000_001])
    assert np.array_equal(vector.means, np.stack([task["means"] for task in expected]))
