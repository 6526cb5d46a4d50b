"""Meta-reinforcement learning: task families (bandit, tabular_mdp, nav2d, halfcheetah_vel),
RL² on RLlib, PEARL, MAML with a policy-gradient inner loop, bandit baselines, the job entry
point and the meta-policy loader."""

from metaserve.workers.rl.job import META_POLICY_JSON, META_POLICY_TENSORS, run_rl_job
from metaserve.workers.rl.loader import MetaPolicy, load_meta_policy

__all__ = ["META_POLICY_JSON", "META_POLICY_TENSORS", "MetaPolicy", "load_meta_policy", "run_rl_job"]
