"""Load a meta-policy artifact (``meta_policy.safetensors`` + ``meta_policy.json``) and run it on
new tasks, in plain torch (no Ray, no RLlib, no pickle).

    policy = load_meta_policy("artifacts/")
    tasks = policy.sample_tasks(100, seed=7)
    policy.evaluate(tasks)  # {"return_step0": ..., "return_step1": ...} or {"trial_return": ...}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from metaserve.workers.engine.artifacts import META_POLICY, read_artifact
from metaserve.workers.rl.tasks import Task, build_rl_family, task_rng
from metaserve.workers.spec import JobSpec


class MetaPolicy:
    """A loaded meta-policy: ``sample_tasks`` draws new tasks of its family, ``evaluate`` runs the
    policy on them with the adaptation its recipe says (PG steps for MAML, the recurrent state
    for RL², the posterior over z for PEARL)."""

    def __init__(self, tensors: dict[str, torch.Tensor], document: dict):
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
            from metaserve.workers.rl.pearl import PEARLAgent

            self.runner = PEARLAgent.from_tensors(self.spec, tensors)
        else:
            raise ValueError(f"unknown meta-policy algorithm {self.algorithm!r}")

    def sample_tasks(self, count: int, *, seed: int = 0) -> list[Task]:
        """``count`` new tasks of the policy's family (independent of the training tasks)."""
        return [self.family.sample_task(task_rng(seed, "test", 1 << 20, index)) for index in range(count)]

    def evaluate(self, tasks: list[Task], *, seed: int = 0, inner_steps: list[int] | None = None
                 ) -> dict[str, float]:
        """Average return on ``tasks`` after adapting to each (see the class docstring)."""
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
    """The meta-policy stored in ``directory`` (as written by a meta-RL job)."""
    tensors, document = read_artifact(Path(directory), META_POLICY)
    return MetaPolicy(tensors, document)
