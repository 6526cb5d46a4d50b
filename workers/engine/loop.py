"""The outer-loop schedule shared by the in-process trainer and the Ray runner.

Both resume from ``out_dir/checkpoint``, advance the meta-parameters to the next point where
something is due, and there log (means over the tasks since the last log, plus tasks/s of the
training steps alone), evaluate on validation tasks, checkpoint and report progress; at the end
they evaluate on the validation and test splits and export ``meta_init.*``. Only *how* the
iterations are computed differs (this process, or inner-loop workers on Ray), so it is passed in
as ``advance`` and ``evaluate``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from metaserve.workers.engine.state import TrainState

if TYPE_CHECKING:
    from metaserve.workers.engine.trainer import Trainer

logger = logging.getLogger(__name__)

CHECKPOINT_DIRECTORY = "checkpoint"

# advance(state, n) -> (state after n more iterations, the n per-iteration metric dicts)
Advance = Callable[[TrainState, int], "tuple[TrainState, list[dict[str, float]]]"]
# evaluate(params, split) -> {"<split>/loss_step1": ..., ...}
Evaluate = Callable[[dict, str], "dict[str, float]"]


class JobCancelled(Exception):
    """The job was cancelled (or its lease was lost) while it ran."""


@dataclass
class RunHooks:
    """What a training loop reports to its caller; all optional.

    ``report(step, metrics)``: metrics at iteration ``step`` (a log window or an evaluation).
    ``progress(dict)``: iteration, total, tasks_per_s, eta_s, workers.
    ``checkpointed(paths)``: files just written to the job directory.
    ``should_stop()``: True when the job must stop (cancelled, lease lost).
    ``workers_ready(list)``: pid, node and device of every inner-loop worker, whenever the
    set of workers changes (start, replacement); Ray runner only.
    """

    report: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    progress: Callable[[dict], None] = lambda progress: None
    checkpointed: Callable[[list[Path]], None] = lambda paths: None
    should_stop: Callable[[], bool] = lambda: False
    workers_ready: Callable[[list[dict]], None] = lambda workers: None


def next_stop(iteration: int, spec) -> int:  # noqa: ANN001 - a JobSpec
    """The next iteration count at which something is logged, evaluated or checkpointed."""
    stops = [spec.iterations]
    for every in (spec.log_every, spec.checkpoint_every, spec.evaluation.every):
        if every:
            stops.append((iteration // every + 1) * every)
    return min(stops)


def train_loop(trainer: "Trainer", out_dir: Path, *, advance: Advance, evaluate: Evaluate,
               hooks: RunHooks, workers: int = 1) -> TrainState:
    """Train ``trainer.spec`` to its last iteration (see the module docstring)."""
    spec = trainer.spec
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / CHECKPOINT_DIRECTORY
    state = trainer.load_checkpoint(checkpoint_dir) or trainer.init_state()
    if state.iteration:
        logger.info("resuming", extra={"iteration": state.iteration, "out_dir": str(out_dir)})
    total, first = spec.iterations, state.iteration
    busy_seconds = window_seconds = 0.0
    window_tasks, window_sums = 0, {}
    while state.iteration < total:
        if hooks.should_stop():
            raise JobCancelled()
        started = time.perf_counter()
        state, per_step = advance(state, next_stop(state.iteration, spec) - state.iteration)
        elapsed = time.perf_counter() - started
        busy_seconds += elapsed
        window_seconds += elapsed
        for metrics in per_step:
            window_tasks += spec.meta_batch_size
            for name, value in metrics.items():
                window_sums[name] = window_sums.get(name, 0.0) + value * spec.meta_batch_size
        done = state.iteration
        if done % spec.log_every == 0 or done == total:
            logged = {name: value / window_tasks for name, value in window_sums.items()}
            logged["train/tasks_per_second"] = window_tasks / window_seconds if window_seconds else 0.0
            hooks.report(done, logged)
            window_seconds, window_tasks, window_sums = 0.0, 0, {}
        if spec.evaluation.every and done % spec.evaluation.every == 0 and done < total:
            hooks.report(done, evaluate(state.params, "val"))
        if done % spec.checkpoint_every == 0 or done == total:
            hooks.checkpointed(trainer.save_checkpoint(state, checkpoint_dir))
        rate = (done - first) / busy_seconds if busy_seconds else 0.0
        hooks.progress({
            "iteration": done, "total": total,
            "tasks_per_s": round(rate * spec.meta_batch_size, 1),
            "eta_s": round((total - done) / rate, 1) if rate else None,
            "workers": workers,
        })
    final = {**evaluate(state.params, "val"), **evaluate(state.params, "test")}
    hooks.report(state.iteration, final)
    hooks.checkpointed(trainer.export_meta_init(state, out_dir, final))
    return state
