"""Runs one meta-RL job on Ray: :func:`run_rl_job`, the RL branch of :func:`metaserve.workers.runner.run_job`.

The algorithm (MAML-RL, RL², PEARL) lives in one :class:`RLJobActor` (a Ray actor with the
job's ``resources.cpus_per_worker`` / ``gpus_per_worker``); RL² builds its RLlib algorithm
there, whose env runners are further Ray actors, and PEARL's rollout workers are Ray actors
too. This function, in the dispatcher's process, drives it one iteration at a time, so a
cancel is seen within an iteration, and does the schedule: metrics every ``log_every``,
evaluation every ``evaluation.every``, a checkpoint every ``checkpoint_every`` and at the end.

Checkpoints: ``checkpoint/checkpoint.safetensors`` (every tensor of the algorithm's state)
+ ``checkpoint/checkpoint.json`` (iteration, the rest of the state, spec), written
atomically; an attempt resumes from them. On success the job directory holds the meta-policy
artifact, ``meta_policy.safetensors`` + ``meta_policy.json`` (architecture, adaptation
recipe, task family, evaluation, spec, versions), which :func:`load_meta_policy` reads.
"""

from __future__ import annotations

import json
import logging
import os
import time
from importlib import metadata
from pathlib import Path

import ray
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from ray.exceptions import RayActorError

from metaserve.workers.engine.checkpoints import (CHECKPOINT_JSON, CHECKPOINT_TENSORS, CheckpointError,
                                        atomic_save_tensors, atomic_write_bytes)
from metaserve.workers.engine.trainer import CHECKPOINT_DIRECTORY
from metaserve.workers.runner import (POLL_S, WORKER_READY_TIMEOUT_S, JobCancelled, RunHooks,
                            Unschedulable, check_schedulable)
from metaserve.workers.spec import JobSpec

logger = logging.getLogger(__name__)

META_POLICY_TENSORS = "meta_policy.safetensors"
META_POLICY_JSON = "meta_policy.json"
FORMAT_VERSION = 1
ACTOR_CLOSE_TIMEOUT_S = 30.0


def build_rl_algorithm(spec: JobSpec):  # noqa: ANN201 - MAMLRL | RL2Trainer | PEARL
    """The algorithm object of an RL job (imports RLlib only for ``rl2``)."""
    name = spec.algorithm.name
    if name == "maml":
        from metaserve.workers.rl.maml_rl import MAMLRL

        return MAMLRL(spec)
    if name == "rl2":
        from metaserve.workers.rl.rl2 import RL2Trainer

        return RL2Trainer(spec)
    if name == "pearl":
        from metaserve.workers.rl.pearl import PEARL

        return PEARL(spec)
    raise ValueError(f"{name!r} is not a meta-RL algorithm")


class RLJobActor:
    """Holds one RL job's algorithm on a Ray worker (see the module docstring)."""

    def __init__(self, spec: dict, torch_threads: int):
        torch.set_num_threads(max(1, torch_threads))
        self.algorithm = build_rl_algorithm(JobSpec.model_validate(spec))

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": "cpu",
                "node": ray.get_runtime_context().get_node_id()}

    def iteration(self) -> int:
        return self.algorithm.iteration

    def train_iteration(self) -> dict[str, float]:
        started = time.monotonic()
        metrics = self.algorithm.train_iteration()
        return {**metrics, "train/iteration_seconds": time.monotonic() - started}

    def evaluate(self, split: str) -> dict[str, float]:
        return self.algorithm.evaluate(split)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.algorithm.state()

    def load_state(self, tensors: dict[str, torch.Tensor], document: dict) -> int:
        self.algorithm.load_state(tensors, document)
        return self.algorithm.iteration

    def meta_policy(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.algorithm.meta_policy()

    def close(self) -> None:
        close = getattr(self.algorithm, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------------- checkpoints


def save_rl_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], document: dict,
                       *, iteration: int, spec: dict) -> list[Path]:
    directory = Path(directory)
    tensors_path, json_path = directory / CHECKPOINT_TENSORS, directory / CHECKPOINT_JSON
    atomic_save_tensors(tensors_path, tensors,
                        {"iteration": str(iteration), "format": str(FORMAT_VERSION)})
    body = {"format": FORMAT_VERSION, "iteration": iteration, "state": document, "spec": spec}
    atomic_write_bytes(json_path, json.dumps(body, indent=2, sort_keys=True).encode())
    return [tensors_path, json_path]


def load_rl_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, state document)`` of the checkpoint in ``directory``, or None."""
    tensors_path, json_path = Path(directory) / CHECKPOINT_TENSORS, Path(directory) / CHECKPOINT_JSON
    if not tensors_path.exists() or not json_path.exists():
        return None
    body = json.loads(json_path.read_text())
    with safe_open(str(tensors_path), framework="pt") as handle:
        tensor_iteration = (handle.metadata() or {}).get("iteration")
    if tensor_iteration != str(body["iteration"]):
        raise CheckpointError(f"checkpoint halves disagree: tensors at iteration "
                              f"{tensor_iteration}, json at {body['iteration']}")
    return load_file(tensors_path), body["state"]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def export_meta_policy(directory: Path, tensors: dict[str, torch.Tensor], document: dict, *,
                       spec: JobSpec, evaluation: dict[str, float], iteration: int) -> list[Path]:
    tensors_path, json_path = Path(directory) / META_POLICY_TENSORS, Path(directory) / META_POLICY_JSON
    atomic_save_tensors(tensors_path, tensors, {"format": str(FORMAT_VERSION)})
    body = {
        "format": FORMAT_VERSION,
        "architecture": document["architecture"],
        "recipe": document["recipe"],
        "task_family": spec.task_family.model_dump(mode="json"),
        "evaluation": evaluation,
        "iterations": iteration,
        "spec": spec.model_dump(mode="json"),
        "versions": {"metaserve": _version("metaserve"), "torch": torch.__version__,
                     "ray": ray.__version__},
    }
    atomic_write_bytes(json_path, json.dumps(body, indent=2, sort_keys=True).encode())
    return [tensors_path, json_path]


# ---------------------------------------------------------------------- the driver


def _wait(ref, hooks: RunHooks, *, timeout_s: float | None = None, what: str = ""):  # noqa: ANN001, ANN202
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        done, _ = ray.wait([ref], timeout=POLL_S)
        if done:
            return ray.get(ref)
        if hooks.should_stop():
            raise JobCancelled()
        if deadline is not None and time.monotonic() > deadline:
            raise Unschedulable(f"waiting for resources: {what}")


def run_rl_job(spec: JobSpec | dict, job_dir: Path, hooks: RunHooks | None = None) -> dict[str, float]:
    """Run the meta-RL job ``spec`` on the connected Ray cluster; artifacts go to ``job_dir``.

    Resumes from ``job_dir``'s checkpoint when there is one. Returns the final evaluation.
    Raises :class:`JobCancelled`, :class:`Unschedulable`, or the job's own error.
    """
    spec = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
    hooks = hooks or RunHooks()
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    check_schedulable(spec)
    resources = spec.resources
    spec_json = spec.model_dump(mode="json")
    checkpoint = load_rl_checkpoint(job_dir / CHECKPOINT_DIRECTORY)
    actor_class = ray.remote(RLJobActor).options(
        num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker, max_restarts=0)
    actor = actor_class.remote(spec_json, max(1, int(resources.cpus_per_worker)))
    started = False
    try:
        info = _wait(actor.ready.remote(), hooks, timeout_s=WORKER_READY_TIMEOUT_S,
                     what=f"the RL job actor could not be placed within "
                          f"{WORKER_READY_TIMEOUT_S:.0f} s")
        started = True
        hooks.workers_ready([info])
        if checkpoint is not None:
            _wait(actor.load_state.remote(*checkpoint), hooks)
        return _drive(spec, spec_json, actor, job_dir, hooks)
    except RayActorError as error:
        raise RuntimeError(f"the RL job actor died: {str(error)[:500]}") from error
    finally:
        if started:  # let RLlib stop its env runners; never wait on an actor still starting
            try:
                ray.get(actor.close.remote(), timeout=ACTOR_CLOSE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - already gone
                pass
        ray.kill(actor)


def _drive(spec: JobSpec, spec_json: dict, actor, job_dir: Path, hooks: RunHooks) -> dict[str, float]:  # noqa: ANN001
    total = spec.iterations
    iteration = first = _wait(actor.iteration.remote(), hooks)
    started = time.monotonic()
    while iteration < total:
        if hooks.should_stop():
            raise JobCancelled()
        metrics = _wait(actor.train_iteration.remote(), hooks)
        iteration += 1
        if iteration % spec.log_every == 0 or iteration == total:
            hooks.report(iteration, metrics)
        if spec.evaluation.every and iteration % spec.evaluation.every == 0 and iteration < total:
            hooks.report(iteration, _wait(actor.evaluate.remote("val"), hooks))
        if iteration % spec.checkpoint_every == 0 or iteration == total:
            tensors, document = _wait(actor.state.remote(), hooks)
            hooks.checkpointed(save_rl_checkpoint(job_dir / CHECKPOINT_DIRECTORY, tensors, document,
                                                  iteration=iteration, spec=spec_json))
        rate = (iteration - first) / max(time.monotonic() - started, 1e-9)
        hooks.progress({"iteration": iteration, "total": total,
                        "iterations_per_s": round(rate, 3),
                        "eta_s": round((total - iteration) / rate, 1) if rate > 0 else None,
                        "workers": 1})
    evaluation: dict[str, float] = {}
    for split in ("val", "test"):
        evaluation.update(_wait(actor.evaluate.remote(split), hooks))
    hooks.report(iteration, evaluation)
    tensors, document = _wait(actor.meta_policy.remote(), hooks)
    hooks.checkpointed(export_meta_policy(job_dir, tensors, document, spec=spec,
                                          evaluation=evaluation, iteration=iteration))
    return evaluation
