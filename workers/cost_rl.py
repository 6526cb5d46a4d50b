"""What a meta-RL job will cost, from its spec (the supervised estimate is
:func:`metaserve.workers.cost.estimate`, which calls this for RL task families).

Figures, dominant terms only (as :mod:`metaserve.workers.cost`):

- ``parameters``: the networks the algorithm trains, counted from their layer sizes (the
  same layers :mod:`metaserve.workers.rl` builds): MAML-RL's Gaussian MLP policy (Finn et al.
  2017, §5.3) with its log-std; RL²'s LSTM with its policy and value heads (Duan et al. 2016);
  PEARL's context encoder, policy, two critics, their two targets and the reward decoder
  (Rakelly et al. 2019).
- ``env_steps``: iterations × the environment steps of one iteration: MAML-RL
  ``meta_batch_size × episodes_per_task × horizon × (inner_steps + 1)`` (trajectories before
  every inner step and after the last); RL² ``meta_batch_size × trial length`` (a trial is
  ``pulls`` pulls of a bandit, ``episodes × horizon`` steps elsewhere); PEARL
  ``tasks_per_iteration × adaptation_episodes × horizon``.
- ``worker_bytes``: the learner process, which holds one iteration's batch with the
  activations its backward pass keeps: every task of the meta-batch at once (MAML-RL's outer
  update and RL²'s PPO epochs run on the whole batch); PEARL's replay buffer keeps every
  transition it ever collected, and a gradient step's batch.
- ``work_flop``: 2 × parameters FLOPs per step sampled, and 3× that per step for every
  update pass over it (PPO epochs; TRPO's conjugate-gradient and line-search passes; PEARL's
  gradient steps on ``meta_batch_size × (batch_size + context_size)`` transitions).
"""

from __future__ import annotations

from typing import Any

from metaserve.workers.spec import JobSpec

HALFCHEETAH_SIZES = (17, 6)
"""gymnasium HalfCheetah-v5: a 17-D observation, 6 torques."""
BATCH_COPIES = 2
"""Copies of a sampled batch a learner holds: the rollouts as collected and the tensors the
update reads (RLlib's episodes and its train batch; MAML-RL's trajectories and their advantages)."""


def _sizes(spec: JobSpec) -> tuple[int, int, bool]:
    """(observation size, action size, discrete actions) of the spec's task family."""
    family = spec.task_family
    if family.name == "bandit":
        return 1, family.arms, True
    if family.name == "tabular_mdp":
        return family.states, family.actions, True
    if family.name == "halfcheetah_vel":
        return (*HALFCHEETAH_SIZES, False)
    return 2, 2, False  # nav2d


def _mlp_parameters(sizes: list[int]) -> int:
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))


def _episode_steps(spec: JobSpec) -> int:
    family = spec.task_family
    return 1 if family.name == "bandit" else family.horizon


def _trial_steps(spec: JobSpec) -> int:
    """Steps of one RL² trial (:attr:`metaserve.workers.rl.tasks.RLTaskFamily.trial_steps`)."""
    family = spec.task_family
    episodes = family.pulls if family.name == "bandit" else family.episodes
    return episodes * _episode_steps(spec)


def rl_figures(spec: JobSpec, runtime_bytes: int, float_bytes: int) -> dict[str, Any]:
    """The fields of :class:`metaserve.workers.cost.CostEstimate` for a meta-RL ``spec`` (see
    the module docstring), given the size of a process and of a float."""
    algorithm = spec.algorithm
    observation, action, discrete = _sizes(spec)
    task_params = 0
    meta_tasks = spec.iterations * spec.meta_batch_size
    if algorithm.name == "rl2":
        hidden = algorithm.hidden_size
        inputs = observation + action + 3  # obs, previous action, reward, done, elapsed
        heads = (hidden + 1) * (action if discrete else 2 * action) + hidden + 1
        parameters = 4 * hidden * (inputs + hidden) + 8 * hidden + heads
        field = "algorithm.hidden_size"
        steps_per_task = _trial_steps(spec)
        # per step: the input, the LSTM's gates and states kept for backward, the heads' outputs
        floats_per_step = inputs + 6 * hidden + 2 * action + 8
        update_passes = algorithm.num_epochs
        at_once = spec.meta_batch_size
        held_params = 4 * parameters  # parameters, gradient, two Adam moments
        extra_bytes = 0
        env_steps = meta_tasks * steps_per_task
    elif algorithm.name == "pearl":
        hidden, latent = algorithm.hidden, algorithm.latent_dim
        transition = 2 * observation + action + 1
        critic_in = observation + action + latent
        parameters = (_mlp_parameters([transition, hidden, hidden, 2 * latent])
                      + _mlp_parameters([observation + latent, hidden, hidden, 2 * action])
                      + 5 * _mlp_parameters([critic_in, hidden, hidden, 1]))
        field = "algorithm.hidden"
        per_iteration = algorithm.tasks_per_iteration * algorithm.adaptation_episodes
        env_steps = spec.iterations * per_iteration * _episode_steps(spec)
        # A gradient step's batch per task: replayed transitions and the context, each
        # through the networks (2 hidden layers' activations kept for backward, 4 networks).
        steps_per_task = algorithm.batch_size + algorithm.context_size
        floats_per_step = transition + latent + 8 * hidden
        update_passes = 0
        at_once = spec.meta_batch_size
        held_params = 4 * parameters
        # The replay buffer keeps every transition collected (one buffer per training task).
        extra_bytes = env_steps * (transition + 1) * float_bytes
    else:  # MAML-RL
        policy = algorithm.policy_gradient
        hidden_sizes = list(policy.hidden) if policy is not None else [100, 100]
        parameters = _mlp_parameters([observation, *hidden_sizes, action]) + action
        field = "algorithm.policy_gradient.hidden"
        episodes = policy.episodes_per_task if policy is not None else 20
        steps = algorithm.inner_steps
        steps_per_task = episodes * _episode_steps(spec) * (steps + 1)
        # per step: observation, action, reward, log-prob, advantage, return, and every layer's
        # output (kept: the outer update differentiates through the inner steps)
        floats_per_step = observation + 2 * action + 4 + 2 * sum(hidden_sizes)
        outer = policy.outer if policy is not None else "ppo"
        update_passes = ((policy.outer_epochs if policy is not None else 5) if outer == "ppo"
                         else policy.cg_iters + policy.line_search_steps)
        at_once = spec.meta_batch_size
        held_params = 4 * parameters
        # per task: an adapted copy of the parameters and its gradient per inner step
        task_params = 2 * (steps + 1) * parameters
        extra_bytes = 0
        env_steps = meta_tasks * steps_per_task
    task_bytes = steps_per_task * (observation + action + 2) * float_bytes
    per_task = (BATCH_COPIES * steps_per_task * floats_per_step + task_params) * float_bytes
    worker_bytes = (runtime_bytes + at_once * per_task + held_params * float_bytes
                    + extra_bytes)
    helpers = runtime_bytes * spec.resources.workers  # rollout actors, env runners
    sampled_flop = 2.0 * parameters * env_steps
    if algorithm.name == "pearl":
        update_flop = (6.0 * parameters * spec.iterations * algorithm.gradient_steps
                       * spec.meta_batch_size * steps_per_task)
    else:
        update_flop = 6.0 * parameters * env_steps * update_passes
    return dict(parameters=parameters, task_bytes=task_bytes, task_memory_bytes=per_task,
                tasks_at_once=at_once, worker_bytes=worker_bytes, driver_bytes=runtime_bytes,
                job_bytes=worker_bytes + helpers, meta_tasks=meta_tasks,
                work_flop=sampled_flop + update_flop, env_steps=int(env_steps),
                parameters_field=field)
