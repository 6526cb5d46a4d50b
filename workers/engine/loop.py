"""The one schedule of every job kind: :func:`train_loop` drives a :class:`Driver`.

A driver holds one job's state and knows how to move it on (a meta-learning job in this
process or sharded over inner-loop workers on Ray; a meta-RL job in its Ray actor). The loop
owns everything else, the same for all: it resumes from ``out_dir/checkpoint``, advances the
driver to the next point where something is due, and there logs (means over the iterations
since the last log, plus the throughput of the training alone: tasks/s or env steps/s),
evaluates on validation tasks, checkpoints and reports progress; at the end it evaluates on the
validation and test splits and exports the job's artifact (``meta_init.*`` or
``meta_policy.*``, :mod:`metaserve.workers.engine.final_artifact`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from torch import Tensor

from metaserve.workers.engine.final_artifact import artifact_kind, export_artifact
from metaserve.workers.engine.checkpoints import (CHECKPOINT_DIRECTORY, Checkpoint, load_checkpoint,
                                                  save_checkpoint)
from metaserve.workers.exceptions import JobCancelled  # noqa: F401 - raised by drivers, re-exported
from metaserve.workers.spec import JobSpec

logger = logging.getLogger(__name__)


@dataclass
class RunHooks:
    """What a training loop reports to its caller; all optional.

    ``report(step, metrics)``: metrics at iteration ``step`` (a log window or an evaluation).
    ``progress(dict)``: iteration, total, eta_s, workers and the throughput: ``tasks_per_s``
    (meta-learning) or ``env_steps_per_s``, ``env_steps`` and ``latest_return`` (meta-RL).
    ``checkpointed(paths)``: files just written to the job directory.
    ``should_stop()``: True when the job must stop (cancelled, lease lost).
    ``workers_ready(list)``: pid, node and device of every worker actor, whenever the set of
    workers changes (start, replacement); Ray drivers only.
    """

    report: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    progress: Callable[[dict], None] = lambda progress: None
    checkpointed: Callable[[list[Path]], None] = lambda paths: None
    should_stop: Callable[[], bool] = lambda: False
    workers_ready: Callable[[list[dict]], None] = lambda workers: None


class Driver(Protocol):
    """One job's state and how to move it on: what :func:`train_loop` drives.

    ``throughput`` names the unit of work the loop reports per second (``tasks`` or
    ``env_steps``) and :meth:`work_done` counts it since the job began (checkpoints included);
    ``latest_return`` names the training metric a meta-RL job's progress shows as its latest
    return (None: none).
    """

    spec: JobSpec
    workers: int
    throughput: str
    latest_return: str | None

    def restore(self, checkpoint: Checkpoint | None) -> int:
        """Start from ``checkpoint`` (None: from the spec's seed); the iterations done."""

    def advance(self, iterations: int) -> list[dict[str, float]]:
        """Run ``iterations`` more meta-iterations; their metrics, one dict each. Raises
        :class:`JobCancelled` when the hooks say stop."""

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics on held-out tasks of ``split`` (``val``, ``test``), names prefixed by it."""

    def work_done(self) -> float:
        """Units of ``throughput`` done since the job began."""

    def checkpoint(self) -> Checkpoint:
        """The state to resume from."""

    def artifact(self) -> tuple[dict[str, Tensor], dict]:
        """The final artifact's tensors and ``{"architecture": ..., "recipe": ...}``."""

    def close(self) -> None:
        """Release what the driver holds (worker actors); called once, after the loop."""


def next_stop(iteration: int, spec: JobSpec) -> int:
    """The next iteration count at which something is logged, evaluated or checkpointed."""
    stops = [spec.iterations]
    for every in (spec.log_every, spec.checkpoint_every, spec.evaluation.every):
        if every:
            stops.append((iteration // every + 1) * every)
    return min(stops)


def train_loop(driver: Driver, out_dir: Path, hooks: RunHooks) -> dict[str, float]:
    """Run ``driver.spec`` to its last iteration (see the module docstring); returns the final
    evaluation."""
    spec = driver.spec
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / CHECKPOINT_DIRECTORY
    spec_json = spec.model_dump(mode="json")
    iteration = first = driver.restore(load_checkpoint(checkpoint_dir))
    if iteration:
        logger.info("resuming", extra={"iteration": iteration, "out_dir": str(out_dir)})
    total, unit = spec.iterations, driver.throughput
    work_at_start = window_work = driver.work_done()
    busy_seconds = window_seconds = 0.0
    window_weight, window_sums = 0, {}
    latest_return: float | None = None
    while iteration < total:
        if hooks.should_stop():
            raise JobCancelled()
        started = time.perf_counter()
        per_step = driver.advance(next_stop(iteration, spec) - iteration)
        elapsed = time.perf_counter() - started
        iteration += len(per_step)
        busy_seconds += elapsed
        window_seconds += elapsed
        for metrics in per_step:
            window_weight += spec.meta_batch_size
            for name, value in metrics.items():
                window_sums[name] = window_sums.get(name, 0.0) + value * spec.meta_batch_size
            if driver.latest_return in metrics:
                latest_return = metrics[driver.latest_return]
        work = driver.work_done()
        if iteration % spec.log_every == 0 or iteration == total:
            logged = {name: value / window_weight for name, value in window_sums.items()}
            logged[f"train/{unit}_per_second"] = (work - window_work) / window_seconds if window_seconds else 0.0
            if unit != "tasks":  # a count of its own (tasks are iterations × meta-batch size)
                logged[f"train/{unit}"] = work
            hooks.report(iteration, logged)
            window_seconds, window_weight, window_sums, window_work = 0.0, 0, {}, work
        if spec.evaluation.every and iteration % spec.evaluation.every == 0 and iteration < total:
            hooks.report(iteration, driver.evaluate("val"))
        if iteration % spec.checkpoint_every == 0 or iteration == total:
            hooks.checkpointed(save_checkpoint(checkpoint_dir, driver.checkpoint(), spec=spec_json))
        rate = (iteration - first) / busy_seconds if busy_seconds else 0.0
        progress = {"iteration": iteration, "total": total,
                    f"{unit}_per_s": round((work - work_at_start) / busy_seconds, 1) if busy_seconds else 0.0,
                    "eta_s": round((total - iteration) / rate, 1) if rate else None,
                    "workers": driver.workers}
        if unit != "tasks":
            progress[unit] = int(work)
        if driver.latest_return is not None:
            progress["latest_return"] = latest_return
        hooks.progress(progress)
    final = {**driver.evaluate("val"), **driver.evaluate("test")}
    hooks.report(iteration, final)
    tensors, described = driver.artifact()
    hooks.checkpointed(export_artifact(
        out_dir, kind=artifact_kind(spec), tensors=tensors,
        architecture=described["architecture"], recipe=described["recipe"],
        task_family=spec.task_family.model_dump(mode="json"), evaluation=final, spec=spec_json,
        iteration=iteration))
    return final
