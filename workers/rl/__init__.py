"""Meta-reinforcement learning.

- Task families (:mod:`.tasks`; nav2d's one simulator :mod:`.nav2d`, half-cheetah
  :mod:`.halfcheetah`, RL²'s trials :mod:`.trials`).
- MAML-RL (:mod:`.maml_rl`; rollouts :mod:`.rollouts`, advantages :mod:`.advantages`, the TRPO
  step :mod:`.trpo`), RL² on RLlib (:mod:`.rl2`, :mod:`.rl2_policy`), PEARL (:mod:`.pearl`;
  agent :mod:`.pearl_agent`, SAC step :mod:`.sac`, replay :mod:`.replay`), bandit baselines
  (:mod:`.baselines`).
- The driver that runs them on the one schedule (:mod:`.driver`) and the meta-policy loader
  (:mod:`.loader`).
"""

from metaserve.workers.engine.final_artifact import META_POLICY_JSON, META_POLICY_TENSORS
from metaserve.workers.rl.loader import MetaPolicy, TaskPolicy, load_meta_policy

__all__ = ["META_POLICY_JSON", "META_POLICY_TENSORS", "MetaPolicy", "TaskPolicy", "load_meta_policy"]
