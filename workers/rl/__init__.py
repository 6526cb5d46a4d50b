"""Meta-reinforcement learning: task families (bandit, tabular_mdp, nav2d, halfcheetah_vel),
RL² on RLlib, PEARL, MAML with a policy-gradient inner loop, bandit baselines, the driver that
runs them on the one schedule (:mod:`metaserve.workers.rl.driver`) and the meta-policy loader."""

from metaserve.workers.engine.artifacts import META_POLICY_JSON, META_POLICY_TENSORS
from metaserve.workers.rl.loader import MetaPolicy, load_meta_policy

__all__ = ["META_POLICY_JSON", "META_POLICY_TENSORS", "MetaPolicy", "load_meta_policy"]
