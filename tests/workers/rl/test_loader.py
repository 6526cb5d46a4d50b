"""The meta-policy a meta-RL job exports, loaded and run in plain torch: ``adapt`` is each
algorithm's own adaptation (MAML-RL's policy-gradient steps, PEARL's posterior over z, RL²'s
fresh trial), ``act`` gives the env's action, and a directory of the other kind is refused
naming its loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaserve.workers.engine.final_artifact import META_INIT, META_POLICY, export_artifact
from metaserve.workers.exceptions import ArtifactError
from metaserve.workers.rl import load_meta_policy
from metaserve.workers.rl.maml_rl import MAMLRL
from metaserve.workers.rl.policies import expand_params
from metaserve.workers.rl.pearl import PEARL
from metaserve.workers.rl.pearl_agent import TRANSITION_SIZE
from metaserve.workers.rl.rl2_policy import rl2_meta_policy, rl2_network, run_rl2_trials
from metaserve.workers.rl.nav2d import Nav2DEnv
from metaserve.workers.rl.tasks import BanditFamily
from metaserve.workers.rl.trials import TrialEnv
from metaserve.workers.spec import JobSpec

MAML = {"algorithm": {"name": "maml", "inner_lr": 0.5, "inner_steps": 1,
                      "policy_gradient": {"episodes_per_task": 4, "hidden": [8], "normalize_actions": True}},
        "task_family": {"name": "nav2d", "horizon": 10}, "meta_batch_size": 2, "iterations": 1}
RL2 = {"algorithm": {"name": "rl2", "hidden_size": 8}, "task_family": {"name": "bandit", "arms": 3, "pulls": 6}}
PEARL_SPEC = {"algorithm": {"name": "pearl", "hidden": 8, "latent_dim": 3, "train_tasks": 2},
              "task_family": {"name": "nav2d", "horizon": 10}}


def export(directory, spec: JobSpec, content: tuple[dict, dict], kind: str = META_POLICY):  # noqa: ANN001, ANN201
    tensors, described = content
    export_artifact(directory, kind=kind, tensors=tensors, architecture=described["architecture"],
                    recipe=described["recipe"], task_family=spec.task_family.model_dump(mode="json"),
                    evaluation={}, spec=spec.model_dump(mode="json"), iteration=1)
    return directory


@pytest.fixture
def maml_policy(tmp_path):  # noqa: ANN001, ANN201
    spec = JobSpec.model_validate(MAML)
    maml = MAMLRL(spec)
    maml.train_iteration()
    return load_meta_policy(export(tmp_path, spec, maml.meta_policy())), maml


def test_maml_rl_adapts_with_the_recipes_policy_gradient_step_on_episodes_of_the_task(maml_policy):
    policy, maml = maml_policy
    task = policy.sample_tasks(1, seed=3)[0]
    adapted = policy.adapt(task, seed=5)
    # the same step by the trainer's own pieces: rollouts from the same generator, one VPG step
    generator = torch.Generator().manual_seed(5)
    goals = torch.as_tensor(task["goal"], dtype=torch.float32)[None]
    params = expand_params({k: v.detach() for k, v in maml.params.items()}, 1)
    params = maml.adapt(params, maml.rollout(params, goals, 4, generator), create_graph=False)
    assert sorted(adapted.params) == sorted(params)
    for name, value in params.items():
        assert torch.equal(adapted.params[name], value[0]), name
    assert not torch.equal(adapted.params["head.weight"], maml.params["head.weight"])
    action = adapted.act(np.zeros(2, np.float32), deterministic=True)
    assert action.shape == (2,) and np.all(np.abs(action) <= 0.1)
    assert policy.episode_return(task, adapted, deterministic=True) <= 0


def test_the_episode_return_is_what_the_gymnasium_env_pays_for_the_actions(maml_policy):
    policy, _ = maml_policy
    task = policy.sample_tasks(1, seed=4)[0]
    adapted = policy.adapt(task, seed=1)
    env = Nav2DEnv(horizon=10, max_action=0.1)
    env.set_task(task)
    observation, _ = env.reset(seed=0)
    total, done = 0.0, False
    while not done:
        observation, reward, terminated, truncated, _ = env.step(adapted.act(observation, deterministic=True))
        total, done = total + reward, terminated or truncated
    assert policy.episode_return(task, adapted, deterministic=True) == pytest.approx(total, abs=1e-9)


def test_rl2_keeps_its_hidden_state_over_a_trial_and_adapt_starts_a_new_one(tmp_path):
    spec = JobSpec.model_validate(RL2)
    family = BanditFamily(spec.task_family)
    torch.manual_seed(0)
    network = rl2_network(family, 8)
    policy = load_meta_policy(export(tmp_path, spec, rl2_meta_policy(network, family)))
    tasks = policy.sample_tasks(5, seed=2)
    # greedy trials played through act() are the trainer's evaluation trials
    played = [policy.episode_return(task, policy.adapt(task), seed=11, deterministic=True) for task in tasks]
    expected = [run_rl2_trials(network, family, [task], seed=11, greedy=True)[0] for task in tasks]
    assert played == expected
    trial = policy.adapt(tasks[0])
    env = TrialEnv(family, seed=0, split="test")
    env.set_task(tasks[0])
    observation, _ = env.reset(seed=0)
    first = trial.act(observation, deterministic=True)
    state = [value.clone() for value in trial.state]
    trial.act(observation, deterministic=True)
    assert not torch.equal(trial.state[0], state[0])  # the trial goes on in the hidden state
    trial.reset()
    assert trial.act(observation, deterministic=True) == first
    assert [value.tolist() for value in trial.state] == [value.tolist() for value in state]
    assert isinstance(first, int) and 0 <= first < 3


def test_pearl_adapts_to_a_given_context_with_the_posterior_and_explores_a_task_without_one(tmp_path):
    spec = JobSpec.model_validate(PEARL_SPEC)
    pearl = PEARL(spec)
    policy = load_meta_policy(export(tmp_path, spec, pearl.meta_policy()))
    context = torch.randn(6, TRANSITION_SIZE, generator=torch.Generator().manual_seed(0))
    adapted = policy.adapt(context=context.numpy(), seed=4)
    expected = pearl.agent.sample_z(context[None], 1, torch.Generator().manual_seed(4))
    assert torch.equal(adapted.z, expected)
    action = adapted.act(np.zeros(2, np.float32), deterministic=True)
    assert action.shape == (2,) and np.all(np.abs(action) <= 0.1)
    task = policy.sample_tasks(1, seed=0)[0]
    explored = policy.adapt(task, seed=4)
    assert explored.z.shape == (1, 3) and not torch.equal(explored.z, adapted.z)
    prior = policy.adapt(seed=4)  # no context, no task: z from the prior
    assert torch.equal(prior.z, torch.randn(1, 3, generator=torch.Generator().manual_seed(4)))


def test_a_meta_init_directory_is_refused_naming_its_loader(tmp_path):
    spec = JobSpec.model_validate({"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}})
    export(tmp_path, spec, ({"w": torch.zeros(1)}, {"architecture": {}, "recipe": {}}), kind=META_INIT)
    with pytest.raises(ArtifactError) as refused:
        load_meta_policy(tmp_path)
    assert str(refused.value) == (f"{tmp_path} has no meta_policy.safetensors, meta_policy.json; "
                                  "it holds a meta_init (load it with load_meta_init)")
