"""RL² (Duan et al. 2016) on RLlib's new API stack: PPO (Schulman et al. 2017) with a recurrent
:class:`~metaserve.workers.rl.policies.RecurrentPolicy` wrapped in an RLlib ``TorchRLModule``.

A trial (``TrialEnv``) is one RLlib episode made of the task's episodes, and its
observations carry the previous action, reward and done flag, so the LSTM state persists
across the episodes of the trial and is reset between trials. ``max_seq_len`` is the trial
length plus one (PPO's learner connector appends one bootstrap step to every episode; with
``max_seq_len`` = the trial length that step spilled into a sequence of its own and the
minibatches cut trials apart), so back-propagation through time spans the whole trial and a
minibatch holds ``minibatch_trials`` whole trials. One iteration is one
``Algorithm.train()`` on ``meta_batch_size`` trials; env runners are Ray actors when
``env_runners`` > 0 (else the sampling runs next to the learner).

Throughput: the network is tiny, so torch runs it on one thread (intra-op threads cost far
more than they bring on a loaded machine: 9 ms against 0.1 ms per batched LSTM step measured
on 2 busy cores), and bandit trials are stepped as one numpy vector env per runner
(:class:`~metaserve.workers.rl.trials.BanditTrialVectorEnv`, RLlib's ``vector_entry_point`` mode) instead
of gymnasium looping over single envs.
"""

from __future__ import annotations

import functools
import itertools
import random
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.tune.registry import register_env

from metaserve.workers.engine.checkpoints import nested_state_from, nested_state_tensors
from metaserve.workers.rl.baselines import BANDIT_BASELINES, PRIOR_PULLS, tune_ucb1, ucb1
from metaserve.workers.rl.rl2_policy import rl2_meta_policy, rl2_network, run_rl2_trials
from metaserve.workers.rl.tasks import build_rl_family
from metaserve.workers.rl.trials import BanditTrialVectorEnv, TrialEnv
from metaserve.workers.spec import TASK_FAMILIES, JobSpec
from metaserve.workers.tasks.base import task_seed

ENV_STREAMS_PER_RUNNER = 1_000_000
TRIALS_PER_ITERATION = 1_000_000  # iteration i's trials are numbered from i × this, per stream
RNG_STREAM = 1_000_007  # task index of the per-iteration seed of sampling and learning
TRIAL_ENV_NAME = "metaserve_rl2_trial"
_env_counter = itertools.count()


def summarize_trial_returns(split: str, totals: dict[str, np.ndarray]) -> dict[str, float]:
    """Each policy's mean total reward per trial and its 95 % CI half-width (normal)."""
    results = {}
    for name, values in totals.items():
        results[f"{split}/{name}_trial_return"] = float(values.mean())
        results[f"{split}/{name}_trial_return_ci95"] = float(1.96 * values.std() / np.sqrt(len(values)))
    return results


def make_trial_env(config: Any) -> TrialEnv | BanditTrialVectorEnv:
    """RLlib env creator: a :class:`TrialEnv` with its own counter-based task stream or, when
    RLlib asks for ``num_envs`` (``vector_entry_point`` mode, bandits), a
    :class:`BanditTrialVectorEnv` whose streams :func:`_number_streams` sets per runner."""
    family_spec = TASK_FAMILIES[config["family"]["name"]].model_validate(config["family"])
    family = build_rl_family(family_spec)
    if "num_envs" in config:
        return BanditTrialVectorEnv(family, int(config["num_envs"]), seed=int(config["seed"]))
    worker = getattr(config, "worker_index", 0) or 0
    stream = worker * ENV_STREAMS_PER_RUNNER + next(_env_counter)
    return TrialEnv(family, seed=int(config["seed"]), stream=stream)


def _number_streams(*, env_runner: Any, env: Any, **kwargs: Any) -> None:
    """``on_environment_created``: runner ``w``'s vector env plays streams from ``w`` × 10⁶
    (RLlib drops the worker index from the config of a ``vector_entry_point`` creator)."""
    if isinstance(env, BanditTrialVectorEnv):
        env.set_streams(int(env_runner.worker_index) * ENV_STREAMS_PER_RUNNER)


def _seed_process(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _start_iteration(runner: Any, *, iteration: int, seed: int) -> None:
    """On an env runner (local or remote), before ``iteration`` samples: seed the process from
    ``(seed, runner)``, number its envs' next trials from ``iteration`` × TRIALS_PER_ITERATION
    and have RLlib reset its envs and episodes. An iteration then depends only on the
    checkpointed state (weights, optimizer, RLlib's counters) and its number, so a resumed job
    samples and learns the bits of an uninterrupted one (the trial a runner had reset its envs
    to at the end of the previous iteration is dropped)."""
    _seed_process(seed + 7919 * int(getattr(runner, "worker_index", 0) or 0))
    env = runner.env.unwrapped if getattr(runner, "env", None) is not None else None
    first_trial = iteration * TRIALS_PER_ITERATION
    if isinstance(env, BanditTrialVectorEnv):
        env.trials[:] = first_trial
    elif env is not None:
        for trial_env in env.envs:
            trial_env.unwrapped.trials = first_trial
    runner._needs_initial_reset = True  # RLlib's SingleAgentEnvRunner: reset at the next sample()


class RealStepAdvantages(ConnectorV2):
    """Learner connector piece run after PPO's GAE: standardizes the advantages over the real
    steps only (``LOSS_MASK``).

    PPO's learner connector appends one artificial bootstrap step to every episode and then
    standardizes advantages over all steps. For a terminated episode that artificial step is
    flagged neither terminated nor truncated, so its GAE target runs on into the next trial
    (the next trial's return, ≈ 5 at n = 10, ≈ 50 at n = 100); it is masked out of the loss but
    not out of the standardization, which shifted every real advantage down by a
    return-sized offset (measured: a +0.2–0.3 policy loss and no learning). Standardizing is
    affine, so re-standardizing over the real steps equals standardizing the raw advantages
    over them."""

    def __call__(self, *, rl_module: Any, batch: dict, episodes: Any, **kwargs: Any) -> dict:
        for module_batch in batch.values():
            if Postprocessing.ADVANTAGES not in module_batch or Columns.LOSS_MASK not in module_batch:
                continue
            advantages = module_batch[Postprocessing.ADVANTAGES]
            real = advantages[module_batch[Columns.LOSS_MASK]]
            module_batch[Postprocessing.ADVANTAGES] = (
                (advantages - real.mean()) / real.std().clamp_min(1e-4))
        return batch


class RL2PPOLearner(PPOTorchLearner):
    """RLlib's PPO learner with :class:`RealStepAdvantages` after its GAE connector piece."""

    def build(self) -> None:
        super().build()
        if self._learner_connector is not None:
            self._learner_connector.append(RealStepAdvantages())


def _schedule(start: float, final: float | None, steps: int) -> float | list[list[float]]:
    """A constant, or RLlib's piecewise-linear schedule from ``start`` to ``final`` over
    ``steps`` env steps (then held)."""
    if final is None:
        return start
    return [[0, start], [steps, final]]


class RL2Module(TorchRLModule, ValueFunctionAPI):
    """RLlib wrapper of :class:`RecurrentPolicy` (the exported network is ``self.network``)."""

    def setup(self) -> None:
        family_spec = TASK_FAMILIES[self.model_config["family"]["name"]].model_validate(
            self.model_config["family"])
        self.network = rl2_network(build_rl_family(family_spec), self.model_config["hidden_size"])

    def get_initial_state(self) -> dict[str, np.ndarray]:
        size = self.network.hidden_size
        return {"h": np.zeros(size, np.float32), "c": np.zeros(size, np.float32)}

    def _run(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        state = batch[Columns.STATE_IN]
        outputs, values, (h, c) = self.network(batch[Columns.OBS], (state["h"], state["c"]))
        return outputs, values, {"h": h, "c": c}

    def _forward(self, batch: dict, **kwargs) -> dict:
        outputs, _, state = self._run(batch)
        return {Columns.ACTION_DIST_INPUTS: outputs, Columns.STATE_OUT: state}

    def _forward_train(self, batch: dict, **kwargs) -> dict:
        outputs, values, state = self._run(batch)
        return {Columns.ACTION_DIST_INPUTS: outputs, Columns.STATE_OUT: state,
                Columns.EMBEDDINGS: values}

    def compute_values(self, batch: dict, embeddings: Any = None) -> torch.Tensor:
        if embeddings is not None:
            return embeddings
        return self._run(batch)[1]


class RL2Trainer:
    """The RL² algorithm object driven by :func:`metaserve.workers.rl.run_rl_job`."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.params = spec.algorithm
        self.family = build_rl_family(spec.task_family)
        family_json = spec.task_family.model_dump(mode="json")
        trial_steps = self.family.trial_steps
        p = self.params
        torch.set_num_threads(1)
        register_env(TRIAL_ENV_NAME, make_trial_env)
        anneal = p.anneal_env_steps or spec.iterations * spec.meta_batch_size * trial_steps
        vectorize = "vector_entry_point" if self.family.name == "bandit" else "sync"
        config = (
            PPOConfig()
            .environment(env=TRIAL_ENV_NAME, env_config={"family": family_json, "seed": spec.seed})
            .env_runners(num_env_runners=p.env_runners, num_envs_per_env_runner=p.envs_per_runner,
                         batch_mode="complete_episodes", rollout_fragment_length="auto",
                         gym_env_vectorize_mode=vectorize)
            .callbacks(on_environment_created=_number_streams)
            .learners(num_learners=0, learner_class=RL2PPOLearner)
            .training(lr=_schedule(p.lr, p.lr_final, anneal), gamma=p.gamma, lambda_=p.gae_lambda,
                      clip_param=p.clip, grad_clip=p.grad_clip, grad_clip_by="global_norm",
                      entropy_coeff=_schedule(p.entropy_coeff, p.entropy_coeff_final, anneal),
                      vf_loss_coeff=p.vf_loss_coeff,
                      num_epochs=p.num_epochs, use_kl_loss=False, vf_clip_param=1e6,
                      train_batch_size_per_learner=spec.meta_batch_size * trial_steps,
                      minibatch_size=min(p.minibatch_trials * (trial_steps + 1),
                                         spec.meta_batch_size * trial_steps))
            .rl_module(rl_module_spec=RLModuleSpec(
                module_class=RL2Module,
                model_config={"family": family_json, "hidden_size": p.hidden_size,
                              "max_seq_len": trial_steps + 1}))
            .reporting(metrics_num_episodes_for_smoothing=spec.meta_batch_size)
            .debugging(seed=spec.seed)
        )
        self.algo = config.build_algo()
        self.iteration = 0
        self.env_steps = 0

    def train_iteration(self) -> dict[str, float]:
        start = functools.partial(_start_iteration, iteration=self.iteration,
                                  seed=task_seed(self.spec.seed, "train", self.iteration, RNG_STREAM))
        self.algo.env_runner_group.foreach_env_runner(start, local_env_runner=True)
        _seed_process(task_seed(self.spec.seed, "train", self.iteration, RNG_STREAM))  # the learner
        result = self.algo.train()
        self.iteration += 1
        runners = result.get("env_runners", {})
        self.env_steps = int(runners.get("num_env_steps_sampled_lifetime", self.env_steps))
        learner = result.get("learners", {}).get("default_policy", {})
        metrics = {"train/trial_return": float(runners.get("episode_return_mean", float("nan")))}
        for name in ("policy_loss", "vf_loss", "entropy"):
            if name in learner:
                metrics[f"train/{name}"] = float(learner[name])
        return {k: v for k, v in metrics.items() if np.isfinite(v)}

    def network(self):  # noqa: ANN201
        module = self.algo.get_module()
        return module.network

    def evaluate(self, split: str) -> dict[str, float]:
        """Total reward per trial on held-out tasks; for bandits, the baselines on the same tasks:
        each policy's mean and 95 % CI half-width."""
        totals, results = self.trial_returns(split)
        return {**results, **summarize_trial_returns(split, totals)}

    def trial_returns(self, split: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The total reward of one trial per held-out task for RL² and, for bandits, each
        baseline, all on the same tasks (task i of every array is the same task, so policies
        can be compared paired by task), and the tuned baselines' exploration coefficients."""
        count = self.params.evaluation_trials
        tasks = self.family.sample_tasks(seed=self.spec.seed, split=split, iteration=0,
                                         task_indices=range(count))
        results = {}
        totals = {"rl2": run_rl2_trials(self.network(), self.family, tasks, seed=self.spec.seed,
                                        split=split)}
        totals["rl2_greedy"] = run_rl2_trials(self.network(), self.family, tasks, seed=self.spec.seed,
                                              split=split, greedy=True)
        if self.family.name == "bandit":
            pulls = self.family.spec.pulls
            for name, baseline in BANDIT_BASELINES.items():
                totals[name] = baseline(tasks, pulls, seed=self.spec.seed)
            tuning_tasks = self.family.sample_tasks(seed=self.spec.seed, split="train",
                                                    iteration=0, task_indices=range(min(count, 500)))
            exploration = tune_ucb1(tuning_tasks, pulls, seed=self.spec.seed)
            totals["ucb1_tuned"] = ucb1(tasks, pulls, seed=self.spec.seed, exploration=exploration)
            results[f"{split}/ucb1_tuned_exploration"] = exploration
            # as the RL² paper's code runs UCB1: Beta(1, 1) pseudo-counts, no forced pulls
            exploration = tune_ucb1(tuning_tasks, pulls, seed=self.spec.seed, prior_pulls=PRIOR_PULLS)
            totals["ucb1_prior_tuned"] = ucb1(tasks, pulls, seed=self.spec.seed, exploration=exploration,
                                              prior_pulls=PRIOR_PULLS)
            results[f"{split}/ucb1_prior_tuned_exploration"] = exploration
        return totals, results

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        learner_state = self.algo.learner_group.get_state()
        document = {"iteration": self.iteration, "env_steps": self.env_steps,
                    "learner_group": nested_state_tensors(learner_state, "learner_group/", tensors),
                    # RLlib's lifetime env-step count: the lr and entropy schedules run on it
                    "metrics": nested_state_tensors(self.algo.metrics.get_state(), "metrics/", tensors)}
        return tensors, document

    def load_state(self, tensors: dict[str, torch.Tensor], document: dict) -> None:
        self.algo.learner_group.set_state(nested_state_from(document["learner_group"], tensors))
        self.algo.env_runner_group.sync_weights(from_worker_or_learner_group=self.algo.learner_group)
        if "metrics" in document:
            self.algo.metrics.set_state(nested_state_from(document["metrics"], tensors))
        self.iteration = int(document["iteration"])
        self.env_steps = int(document["env_steps"])

    def meta_policy(self) -> tuple[dict[str, torch.Tensor], dict]:
        return rl2_meta_policy(self.network(), self.family)

    def close(self) -> None:
        self.algo.stop()
