"""The meta-RL additions to the job spec: defaults that work, and invalid combinations
rejected naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from metaserve.workers.spec import ALGORITHMS, TASK_FAMILIES, JobSpec, PolicyGradientSpec


@pytest.mark.parametrize("algorithm, family", [("rl2", "bandit"), ("rl2", "tabular_mdp"),
                                               ("rl2", "nav2d"), ("pearl", "nav2d"),
                                               ("maml", "nav2d"), ("maml", "halfcheetah_vel"),
                                               ("rl2", "halfcheetah_vel")])
def test_two_line_rl_jobs_are_valid_and_have_no_supervised_model(algorithm, family):
    spec = JobSpec.model_validate({"algorithm": {"name": algorithm}, "task_family": {"name": family}})
    assert (spec.is_rl, spec.model) == (True, None)


def test_rl_algorithms_and_families_are_in_the_catalog_registries():
    assert {"rl2", "pearl"} <= set(ALGORITHMS)
    assert {"bandit", "tabular_mdp", "nav2d", "halfcheetah_vel"} <= set(TASK_FAMILIES)


@pytest.mark.parametrize("document, field, message", [
    ({"algorithm": {"name": "rl2"}, "task_family": {"name": "sine"}}, ("task_family",),
     "Value error, algorithm 'rl2' needs an RL task family (bandit, halfcheetah_vel, nav2d, tabular_mdp), got 'sine'"),
    ({"algorithm": {"name": "pearl"}, "task_family": {"name": "bandit"}}, ("task_family",),
     "Value error, task family 'bandit' runs with algorithm 'rl2', not 'pearl'"),
    ({"algorithm": {"name": "pearl"}, "task_family": {"name": "halfcheetah_vel"}}, ("task_family",),
     "Value error, task family 'halfcheetah_vel' runs with algorithm 'rl2' or 'maml', not 'pearl'"),
    ({"algorithm": {"name": "reptile"}, "task_family": {"name": "nav2d"}}, ("task_family",),
     "Value error, task family 'nav2d' runs with algorithm 'rl2' or 'pearl' or 'maml', not 'reptile'"),
    ({"algorithm": {"name": "maml", "policy_gradient": {}}, "task_family": {"name": "sine"}},
     ("task_family",), "Value error, algorithm.policy_gradient is only for RL task families "
                       "(bandit, halfcheetah_vel, nav2d, tabular_mdp), got 'sine'"),
    ({"algorithm": {"name": "rl2"}, "task_family": {"name": "bandit"}, "model": {"name": "mlp"}},
     ("model",), "Value error, RL jobs take their policy architecture from the algorithm's "
                 "parameters; leave model out"),
])
def test_invalid_combinations_are_rejected_on_the_field(document, field, message):
    with pytest.raises(ValidationError) as raised:
        JobSpec.model_validate(document)
    assert [(e["loc"], e["msg"]) for e in raised.value.errors()] == [(field, message)]


@pytest.mark.parametrize("document, loc", [
    ({"algorithm": {"name": "rl2", "hidden_size": 0}, "task_family": {"name": "bandit"}},
     ("algorithm", "rl2", "hidden_size")),
    ({"algorithm": {"name": "rl2"}, "task_family": {"name": "bandit", "arms": 1}},
     ("task_family", "bandit", "arms")),
    ({"algorithm": {"name": "rl2", "lr_final": 0}, "task_family": {"name": "bandit"}},
     ("algorithm", "rl2", "lr_final")),
    ({"algorithm": {"name": "rl2", "entropy_coeff_final": -0.1}, "task_family": {"name": "bandit"}},
     ("algorithm", "rl2", "entropy_coeff_final")),
    ({"algorithm": {"name": "pearl", "colour": 1}, "task_family": {"name": "nav2d"}},
     ("algorithm", "pearl", "colour")),
    ({"algorithm": {"name": "maml", "policy_gradient": {"gamma": 2}},
      "task_family": {"name": "nav2d"}}, ("algorithm", "maml", "policy_gradient", "gamma")),
    ({"algorithm": {"name": "pearl"}, "task_family": {"name": "nav2d", "goal_range": [1, 0]}},
     ("task_family", "nav2d")),
])
def test_out_of_bounds_and_unknown_fields_are_rejected(document, loc):
    with pytest.raises(ValidationError) as raised:
        JobSpec.model_validate(document)
    assert [e["loc"] for e in raised.value.errors()] == [loc]


def test_maml_on_supervised_families_keeps_its_previous_defaults():
    spec = JobSpec.model_validate({"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}})
    assert spec.algorithm.policy_gradient is None and spec.model.name == "mlp"
    assert PolicyGradientSpec().hidden == [100, 100]
