"""The driver of a meta-RL job (MAML-RL, RL², PEARL) for the one schedule of
:func:`metaserve.workers.engine.loop.train_loop`.

The algorithm lives in one :class:`RLJobActor` (a Ray actor placed like an inner-loop worker,
by the job's ``resources`` and the server's :class:`~metaserve.workers.runner.RunOptions`);
RL² builds its RLlib algorithm there, whose env runners are further Ray actors, and PEARL's
rollout workers are Ray actors too. :class:`RLDriver`, in the job's driver process, calls it
one iteration at a time, so a cancel is seen within an iteration. The algorithms compute on
the CPU (a GPU a job asks for is placed and checked, not used).

An RL algorithm is a class with this interface (see :data:`RL_ALGORITHMS`)::

    algorithm = Algorithm(spec)          # from the spec's seed
    algorithm.iteration, algorithm.env_steps
    algorithm.train_iteration() -> {"train/...": value}
    algorithm.evaluate(split) -> {"<split>/...": value}
    algorithm.state() -> (tensors, JSON document)      # what a checkpoint holds
    algorithm.load_state(tensors, document)
    algorithm.meta_policy() -> (tensors, {"architecture": ..., "recipe": ...})
    algorithm.close()
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import RayActorError
from torch import Tensor

from metaserve.workers.engine.checkpoints import Checkpoint
from metaserve.workers.engine.loop import RunHooks
from metaserve.workers.exceptions import JobCancelled, Unschedulable
from metaserve.workers.log_capture import forward_logs_to
from metaserve.workers.runner import (POLL_S, WORKER_READY_TIMEOUT_S, RunOptions, actor_resources,
                                      check_schedulable, worker_device)
from metaserve.workers.spec import JobSpec

ACTOR_CLOSE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RLAlgorithmEntry:
    """Where an RL algorithm's class is (imported on use: RL² needs RLlib) and which of its
    training metrics is the latest return that progress shows."""

    path: str
    return_metric: str

    def load(self) -> type:
        module, _, name = self.path.partition(":")
        return getattr(importlib.import_module(module), name)


RL_ALGORITHMS: dict[str, RLAlgorithmEntry] = {
    "maml": RLAlgorithmEntry("metaserve.workers.rl.maml_rl:MAMLRL", "train/return_after"),
    "rl2": RLAlgorithmEntry("metaserve.workers.rl.rl2:RL2Trainer", "train/trial_return"),
    "pearl": RLAlgorithmEntry("metaserve.workers.rl.pearl:PEARL", "train/episode_return"),
}


def build_rl_algorithm(spec: JobSpec):  # noqa: ANN201 - MAMLRL | RL2Trainer | PEARL
    """The algorithm object of an RL job."""
    try:
        entry = RL_ALGORITHMS[spec.algorithm.name]
    except KeyError:
        raise ValueError(f"{spec.algorithm.name!r} is not a meta-RL algorithm; known: "
                         f"{', '.join(sorted(RL_ALGORITHMS))}") from None
    return entry.load()(spec)


class RLJobActor:
    """Holds one RL job's algorithm on a Ray worker (see the module docstring)."""

    def __init__(self, spec: JobSpec, options: RunOptions, torch_threads: int):
        forward_logs_to(options.log_sink, f"rl actor pid {os.getpid()}")
        torch.set_num_threads(max(1, torch_threads))
        # a Ray GPU on a node without CUDA is a misconfigured node: an error, as for any worker
        worker_device(spec.resources.gpus_per_worker, options.gpu_resource, torch.cuda.is_available())
        self.algorithm = build_rl_algorithm(spec)

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": "cpu",
                "node": ray.get_runtime_context().get_node_id()}

    def train_iteration(self) -> tuple[dict[str, float], int]:
        """One iteration's metrics and the env steps taken since the job began."""
        metrics = self.algorithm.train_iteration()
        return metrics, self.algorithm.env_steps

    def evaluate(self, split: str) -> dict[str, float]:
        return self.algorithm.evaluate(split)

    def state(self) -> tuple[dict[str, Tensor], dict]:
        return self.algorithm.state()

    def load_state(self, tensors: dict[str, Tensor], document: dict) -> tuple[int, int]:
        self.algorithm.load_state(tensors, document)
        return self.algorithm.iteration, self.algorithm.env_steps

    def meta_policy(self) -> tuple[dict[str, Tensor], dict]:
        return self.algorithm.meta_policy()

    def close(self) -> None:
        self.algorithm.close()


class RLDriver:
    """A meta-RL job's :class:`~metaserve.workers.engine.loop.Driver` (see the module docstring)."""

    throughput = "env_steps"
    workers = 1

    def __init__(self, spec: JobSpec, hooks: RunHooks, options: RunOptions):
        check_schedulable(spec, options)
        self.spec, self.hooks, self.options = spec, hooks, options
        self.latest_return = RL_ALGORITHMS[spec.algorithm.name].return_metric
        self.actor = None
        self.started = False
        self.iteration = 0
        self.env_steps = 0

    def _wait(self, ref, *, timeout_s: float | None = None, what: str = ""):  # noqa: ANN001, ANN202
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            done, _ = ray.wait([ref], timeout=POLL_S)
            if done:
                try:
                    return ray.get(ref)
                except RayActorError as error:
                    raise RuntimeError(f"the RL job actor died: {str(error)[:500]}") from error
            if self.hooks.should_stop():
                raise JobCancelled()
            if deadline is not None and time.monotonic() > deadline:
                raise Unschedulable(f"waiting for resources: {what}")

    def _start(self) -> None:
        resources = self.spec.resources
        actor_class = ray.remote(RLJobActor).options(max_restarts=0,
                                                     **actor_resources(resources, self.options))
        self.actor = actor_class.remote(self.spec, self.options,
                                        max(1, int(resources.cpus_per_worker)))
        info = self._wait(self.actor.ready.remote(), timeout_s=WORKER_READY_TIMEOUT_S,
                          what=f"the RL job actor could not be placed within "
                               f"{WORKER_READY_TIMEOUT_S:.0f} s")
        self.started = True
        self.hooks.workers_ready([info])

    def restore(self, checkpoint: Checkpoint | None) -> int:
        self._start()
        if checkpoint is not None:
            self.iteration, self.env_steps = self._wait(
                self.actor.load_state.remote(checkpoint.tensors, checkpoint.state))
        return self.iteration

    def advance(self, iterations: int) -> list[dict[str, float]]:
        per_step = []
        for _ in range(iterations):
            if self.hooks.should_stop():
                raise JobCancelled()
            metrics, self.env_steps = self._wait(self.actor.train_iteration.remote())
            self.iteration += 1
            per_step.append(metrics)
        return per_step

    def evaluate(self, split: str) -> dict[str, float]:
        return self._wait(self.actor.evaluate.remote(split))

    def work_done(self) -> float:
        return float(self.env_steps)

    def checkpoint(self) -> Checkpoint:
        tensors, document = self._wait(self.actor.state.remote())
        return Checkpoint(tensors=tensors, state=document, iteration=self.iteration)

    def artifact(self) -> tuple[dict[str, Tensor], dict]:
        return self._wait(self.actor.meta_policy.remote())

    def close(self) -> None:
        if self.actor is None:
            return
        if self.started:  # let RLlib stop its env runners; never wait on an actor still starting
            try:
                ray.get(self.actor.close.remote(), timeout=ACTOR_CLOSE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - already gone
                pass
        ray.kill(self.actor)
        self.actor = None
