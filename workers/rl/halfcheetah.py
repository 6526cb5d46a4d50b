"""``halfcheetah_vel``'s environment: MuJoCo's half-cheetah (gymnasium's HalfCheetah-v5 model)
rewarded for running at a goal velocity: −|v − goal| − ``CHEETAH_CONTROL_COST`` ‖a‖² (Finn et al.
2017, §5.3)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np

CHEETAH_TOTAL_MASS = 14.0
CHEETAH_CONTROL_COST = 0.05


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
