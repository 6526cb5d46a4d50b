"""The cost estimate: exact parameter counts from the meta device, sizes that follow the spec."""

from __future__ import annotations

import pytest

from metaserve.workers import cost
from metaserve.workers.cost import RUNTIME_BYTES, CostEstimate
from metaserve.workers.engine.trainer import Trainer
from metaserve.workers.spec import JobSpec


def estimate(document: dict) -> CostEstimate:
    """:func:`metaserve.workers.cost.estimate` of a spec written here as a document (parsed
    here, at this file's edge)."""
    return cost.estimate(JobSpec.model_validate(document))

SPECS = {
    "sine_mlp": {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}},
    "prompt": {"algorithm": {"name": "prompt", "prompt_dim": 6}, "task_family": {"name": "sine"}},
    "metasgd": {"algorithm": {"name": "metasgd"}, "task_family": {"name": "linear"},
                "model": {"name": "mlp", "hidden": [7, 3]}},
    "glyphs_conv4": {"algorithm": {"name": "maml"},
                     "task_family": {"name": "glyphs", "ways": 3, "image_size": 20,
                                     "num_characters": 60},
                     "model": {"name": "conv4", "filters": 5, "norm": "layer"}},
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_parameter_count_is_the_models_own(name: str):
    trainer = Trainer(SPECS[name])
    params = trainer.model.init_params(__import__("torch").Generator())
    assert estimate(SPECS[name]).parameters == sum(value.numel() for value in params.values())


def test_a_billion_parameter_network_is_estimated_without_allocating_it():
    cost = estimate({"algorithm": {"name": "maml"}, "task_family": {"name": "sine"},
                     "model": {"name": "mlp", "hidden": [8192] * 16}})
    assert cost.parameters == 1 * 8192 + 8192 + 15 * (8192 * 8192 + 8192) + 8192 + 1
    assert cost.driver_bytes > 16 * 4 * cost.parameters


def test_memory_follows_the_tasks_a_worker_holds_at_once():
    base = {"algorithm": {"name": "maml", "inner_steps": 2}, "task_family": {"name": "glyphs"},
            "meta_batch_size": 16}
    whole = estimate(base)
    chunked = estimate({**base, "resources": {"task_chunk": 4}})
    two_workers = estimate({**base, "resources": {"workers": 2}})
    assert (whole.tasks_at_once, chunked.tasks_at_once, two_workers.tasks_at_once) == (16, 4, 8)
    assert whole.worker_bytes - chunked.worker_bytes == 12 * whole.task_memory_bytes
    assert two_workers.job_bytes == two_workers.driver_bytes + 2 * two_workers.worker_bytes


def test_task_bytes_are_the_sampled_inputs():
    cost = estimate({"algorithm": {"name": "maml"},
                     "task_family": {"name": "glyphs", "ways": 4, "support_shots": 2,
                                     "query_shots": 3, "image_size": 16}})
    assert cost.task_bytes == 4 * (2 + 3) * 16 * 16 * 4
    assert cost.meta_tasks == JobSpec.model_validate(SPECS["sine_mlp"]).iterations * 25


def test_rl_parameters_are_the_policies_own():
    """The counts match the networks metaserve.workers.rl builds for these specs."""
    import torch

    from metaserve.workers.rl.pearl_agent import PEARLAgent, mlp
    from metaserve.workers.rl.policies import GaussianMLPPolicy, RecurrentPolicy

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    maml = estimate({"algorithm": {"name": "maml", "policy_gradient": {"hidden": [32, 16]}},
                     "task_family": {"name": "halfcheetah_vel"}})
    assert maml.parameters == count(GaussianMLPPolicy(17, 6, [32, 16]))
    rl2 = estimate({"algorithm": {"name": "rl2", "hidden_size": 24},
                    "task_family": {"name": "bandit", "arms": 7}})
    assert rl2.parameters == count(RecurrentPolicy(1 + 7 + 3, 7, 24, True))
    pearl = estimate({"algorithm": {"name": "pearl", "hidden": 16, "latent_dim": 3},
                      "task_family": {"name": "nav2d"}})
    # the agent, and sac.py's two critics, their two targets and the reward decoder
    critic = mlp([2 + 2 + 3, 16, 16, 1])
    assert pearl.parameters == count(PEARLAgent(3, 16, 0.1)) + 5 * count(critic)


def test_rl_environment_steps_per_algorithm():
    maml = estimate({"algorithm": {"name": "maml", "inner_steps": 2,
                                   "policy_gradient": {"episodes_per_task": 3}},
                     "task_family": {"name": "nav2d", "horizon": 50},
                     "iterations": 7, "meta_batch_size": 5})
    assert maml.env_steps == 7 * 5 * 3 * 50 * (2 + 1)
    bandit = estimate({"algorithm": {"name": "rl2"}, "task_family": {"name": "bandit", "pulls": 40},
                       "iterations": 7, "meta_batch_size": 5})
    assert bandit.env_steps == 7 * 5 * 40
    mdp = estimate({"algorithm": {"name": "rl2"},
                    "task_family": {"name": "tabular_mdp", "horizon": 6, "episodes": 4},
                    "iterations": 7, "meta_batch_size": 5})
    assert mdp.env_steps == 7 * 5 * 6 * 4
    pearl = estimate({"algorithm": {"name": "pearl", "tasks_per_iteration": 3,
                                    "adaptation_episodes": 2},
                      "task_family": {"name": "nav2d", "horizon": 20}, "iterations": 7})
    assert pearl.env_steps == 7 * 3 * 2 * 20


def test_rl_learner_memory_grows_with_the_batch_it_holds():
    small = estimate({"algorithm": {"name": "rl2"}, "task_family": {"name": "bandit"},
                      "meta_batch_size": 8})
    large = estimate({"algorithm": {"name": "rl2"}, "task_family": {"name": "bandit"},
                      "meta_batch_size": 16})
    assert large.worker_bytes - small.worker_bytes == 8 * small.task_memory_bytes > 0
    assert small.work_flop > 0
