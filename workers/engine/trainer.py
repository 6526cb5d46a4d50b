"""Meta-learning's arithmetic: :class:`Trainer` (one meta-iteration, in one piece or shard by
shard: ``shard_step`` on inner-loop workers, ``apply`` on the runner; evaluation; the
artifact's content), and the :class:`~metaserve.workers.engine.loop.Driver` of a meta-learning
job (:class:`MetaLearningDriver`; :class:`LocalDriver` runs it in this process, as
``metaserve train`` does, the Ray runner shards it over inner-loop workers).

Determinism: tasks come from the counter-based seed ``(seed, split, iteration, task)``, the
initial parameters from ``seed``, the outer optimizer state is checkpointed exactly, and shard
results are combined in list order — so the same spec, seed and shard layout give the same
bits, interrupted or not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from metaserve.workers.algorithms import build_algorithm
from metaserve.workers.engine.checkpoints import (CHECKPOINT_DIRECTORY, Checkpoint,  # noqa: F401 (re-exported)
                                                  load_checkpoint, save_checkpoint, train_state_from,
                                                  train_state_tensors)
from metaserve.workers.engine.evaluation import summarize
from metaserve.workers.engine.loop import RunHooks, train_loop
from metaserve.workers.engine.optimizers import init_optimizer_state, optimizer_step
from metaserve.workers.engine.state import ShardResult, TrainState
from metaserve.workers.networks import model_for
from metaserve.workers.spec import JobSpec
from metaserve.workers.tasks import build_task_family
from metaserve.workers.tasks.base import TaskBatch

logger = logging.getLogger(__name__)

DEFAULT_EVALUATION_CHUNK = 500  # tasks vectorized at once during evaluation when task_chunk is unset
Reporter = Callable[[int, dict[str, float]], None]


class TaskPrefetcher:
    """Samples tasks in one background thread ahead of their use, for families whose sampling
    costs (images: rendering, distortion); inline otherwise.

    A batch is keyed by what it is a pure function of — ``(split, iteration, task indices,
    support shots)``, the counter-based seed — so a prefetched batch has the bits an inline
    sample would, and a batch lost with the process (SIGKILL) is sampled again on resume.
    :meth:`batches` yields a list of keys' batches in order, the sampler running
    :data:`LOOKAHEAD` batches ahead, and then starts the ``then`` keys (the next iteration's);
    a started batch of the same split that is not asked for next is dropped (an evaluation in
    between keeps the next training batch)."""

    LOOKAHEAD = 2

    def __init__(self, sample: Callable[[tuple], TaskBatch], background: bool):
        self._sample = sample
        self._background = background
        self._pool: ThreadPoolExecutor | None = None
        self._started: dict[tuple, Future] = {}

    def _start(self, key: tuple) -> Future:
        if key not in self._started:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-prefetch")
            self._started[key] = self._pool.submit(self._sample, key)
        return self._started[key]

    def batches(self, keys: list[tuple], then: Sequence[tuple] = ()) -> Iterator[TaskBatch]:
        if not self._background:
            for key in keys:
                yield self._sample(key)
            return
        for key in [key for key in self._started if key[0] == keys[0][0] and key not in keys]:
            self._started.pop(key).cancel()  # a guess of this split's next keys that missed
        for index, key in enumerate(keys):
            for ahead in keys[index:index + self.LOOKAHEAD]:
                self._start(ahead)
            if index == len(keys) - 1:
                for ahead in then:
                    self._start(ahead)
            yield self._started.pop(key).result()

    def close(self) -> None:
        for future in self._started.values():
            future.cancel()
        self._started.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _chunks(indices: Sequence[int], size: int | None) -> list[list[int]]:
    indices = [int(i) for i in indices]
    if not size or size >= len(indices):
        return [indices]
    return [indices[start:start + size] for start in range(0, len(indices), size)]


class Trainer:
    """Meta-trains the job described by ``spec`` on ``device`` (see the module docstring)."""

    def __init__(self, spec: JobSpec | dict, device: str | torch.device = "cpu"):
        self.spec = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
        self.device = torch.device(device)
        self.family = build_task_family(self.spec.task_family)
        # A family that resolves its spec against its data (tabular: ``features: null`` -> the
        # table's columns) is trained, checkpointed and exported with the resolved spec.
        resolved = getattr(self.family, "spec", self.spec.task_family)
        if resolved != self.spec.task_family:
            self.spec = self.spec.model_copy(update={"task_family": resolved})
        self.model = model_for(self.spec)
        self.algorithm = build_algorithm(self.spec.algorithm, self.model,
                                         classification=bool(self.family.is_classification),
                                         fast_path=self.spec.resources.fast_path)
        # image tasks are sampled one batch ahead in a thread (their sampling renders and
        # distorts); a regression task costs less to sample than to hand over
        self.prefetcher = TaskPrefetcher(self._sample, background=len(self.family.input_shape) > 1)

    # ------------------------------------------------------------------ state

    def init_state(self) -> TrainState:
        generator = torch.Generator()
        generator.manual_seed(self.spec.seed)
        params = {name: value.to(self.device) for name, value in self.algorithm.init_params(generator).items()}
        opt_state = init_optimizer_state(self.spec.outer_optimizer, params)
        return TrainState(params=params, opt_state=opt_state, iteration=0)

    def _sample(self, key: tuple) -> TaskBatch:
        split, iteration, task_indices, support_shots = key
        return self.family.sample(seed=self.spec.seed, split=split, iteration=iteration,
                                  task_indices=list(task_indices), support_shots=support_shots)

    @property
    def evaluation_chunk(self) -> int:
        """Tasks vectorized at once in evaluation: ``task_chunk``, else the meta-batch size for
        image tasks (a chunk as large as a training step's), else :data:`DEFAULT_EVALUATION_CHUNK`."""
        if self.spec.resources.task_chunk:
            return self.spec.resources.task_chunk
        return self.spec.meta_batch_size if len(self.family.input_shape) > 1 else DEFAULT_EVALUATION_CHUNK

    def close(self) -> None:
        """Stop the background sampler (the trainer stays usable: it restarts on demand)."""
        self.prefetcher.close()

    def _on_device(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: value.to(self.device) for name, value in tensors.items()}

    # ------------------------------------------------------------------ one meta-iteration

    def shard_step(self, params: dict[str, Tensor], iteration: int, task_indices: Sequence[int]) -> ShardResult:
        """Sum of the per-task meta-gradients of tasks ``task_indices`` of ``iteration`` and their
        per-task metrics; tasks are sampled here and adapted ``vmap``-ped, ``task_chunk`` at a time."""
        params = self._on_device(params)
        begin_iteration = getattr(self.algorithm, "begin_iteration", None)  # MAML++'s schedules
        if begin_iteration is not None:
            begin_iteration(iteration)
        grad_sum: dict[str, Tensor] | None = None
        metric_parts: dict[str, list[Tensor]] = {}
        chunks = _chunks(task_indices, self.spec.resources.task_chunk)
        keys = [("train", iteration, tuple(chunk), None) for chunk in chunks]
        following = [("train", iteration + 1, tuple(chunk), None) for chunk in chunks]  # the next iteration's
        for batch in self.prefetcher.batches(keys, then=following):
            batch = batch.to(self.device)
            grads, metrics = self.algorithm.meta_gradient(params, *batch)
            grad_sum = grads if grad_sum is None else {name: grad_sum[name] + grads[name] for name in grad_sum}
            for name, values in metrics.items():
                metric_parts.setdefault(name, []).append(values.detach())
        assert grad_sum is not None, "shard_step needs at least one task"
        return ShardResult(
            grad_sum={name: value.detach().cpu() for name, value in grad_sum.items()},
            metrics={name: torch.cat(parts).cpu() for name, parts in metric_parts.items()},
            num_tasks=sum(len(chunk) for chunk in chunks),
        )

    def apply(self, state: TrainState, results: list[ShardResult]) -> TrainState:
        """Sum the shards' gradients in list order, divide by the meta-batch size, take one
        outer optimizer step; returns the new state (``state`` is not mutated)."""
        if not results:
            raise ValueError("apply needs at least one shard result")
        total = dict(results[0].grad_sum)
        for result in results[1:]:
            total = {name: total[name] + result.grad_sum[name] for name in total}
        mean_grad = {name: (value / self.spec.meta_batch_size).to(self.device) for name, value in total.items()}
        params, opt_state = optimizer_step(self.spec.outer_optimizer, state.params, mean_grad, state.opt_state)
        return TrainState(params=params, opt_state=opt_state, iteration=state.iteration + 1)

    def step(self, state: TrainState) -> tuple[TrainState, dict[str, float]]:
        """One meta-iteration over the whole meta-batch in this process; returns mean train metrics."""
        result = self.shard_step(state.params, state.iteration, range(self.spec.meta_batch_size))
        metrics = {f"train/{name}": float(values.float().mean()) for name, values in result.metrics.items()}
        return self.apply(state, [result]), metrics

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, params: dict[str, Tensor], *, split: str = "val", tasks: int | None = None,
                 support_shots: int | None = None) -> dict[str, float]:
        """Query loss (and accuracy) on ``tasks`` held-out tasks of ``split`` before adaptation and
        after each of ``spec.evaluation.inner_steps`` steps: mean and 95 % CI half-width, as the
        served predictor computes them; with batch norm also the transductive number (query-batch
        statistics, MAML's paper) after the last step, ``{split}/transductive_accuracy_step{k}``."""
        count = tasks or self.spec.evaluation.tasks
        shots = support_shots or self.spec.evaluation.support_shots
        steps = sorted({0, *self.spec.evaluation.inner_steps})
        params = self._on_device(params)
        # batch norm: also the paper's (transductive) number, after the last step only — from
        # the same adaptation, so the second pass costs one query forward per task
        transductive_steps = (steps[-1],) if self.algorithm.trains_transductive else ()
        passes: list[list[tuple[Tensor, Tensor]]] = [[], []]
        keys = [(split, 0, tuple(chunk), shots) for chunk in _chunks(range(count), self.evaluation_chunk)]
        for batch in self.prefetcher.batches(keys):
            batch = batch.to(self.device)
            curves = self.algorithm.evaluation_passes(params, *batch, served_steps=tuple(steps),
                                                      transductive_steps=transductive_steps)
            for parts, (loss, acc) in zip(passes, curves):
                parts.append((loss.detach().cpu(), acc.detach().cpu()))
        classification = self.family.is_classification

        def summary(pass_steps: list[int], parts: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
            return summarize(split, pass_steps, torch.cat([loss for loss, _ in parts]),
                             torch.cat([acc for _, acc in parts]) if classification else None)

        result = summary(steps, passes[0])
        if transductive_steps:
            result.update({name.replace("/", "/transductive_", 1): value
                           for name, value in summary(list(transductive_steps), passes[1]).items()
                           if not name.endswith("/tasks")})
        return result

    # ------------------------------------------------------------------ persistence

    def save_checkpoint(self, state: TrainState, directory: Path) -> list[Path]:
        checkpoint = Checkpoint(train_state_tensors(state), iteration=state.iteration)
        return save_checkpoint(Path(directory), checkpoint, spec=self.spec.model_dump(mode="json"))

    def load_checkpoint(self, directory: Path) -> TrainState | None:
        checkpoint = load_checkpoint(Path(directory), device=self.device)
        return None if checkpoint is None else train_state_from(checkpoint)

    def artifact(self, state: TrainState) -> tuple[dict[str, Tensor], dict]:
        """The meta-initialization's tensors, architecture and adaptation recipe."""
        recipe = self.algorithm.recipe()
        if hasattr(self.family, "recipe"):  # what a served task needs of the data (tabular)
            recipe["data"] = self.family.recipe()
        return (self.algorithm.export_params(state.params),
                {"architecture": self.model.describe(), "recipe": recipe})

    # ------------------------------------------------------------------ the in-process loop

    def run(self, out_dir: Path, *, reporter: Reporter | None = None, progress: bool = False) -> TrainState:
        """Train to ``spec.iterations`` in this process, resuming from ``out_dir/checkpoint``;
        ends with the validation and test evaluations and ``meta_init.*`` in ``out_dir``."""
        driver = LocalDriver(self, progress=progress)
        try:
            train_loop(driver, Path(out_dir), RunHooks(report=reporter or (lambda step, metrics: None)))
        finally:
            driver.close()
        return driver.state


class MetaLearningDriver:
    """The :class:`~metaserve.workers.engine.loop.Driver` of a meta-learning job: the state is
    a :class:`TrainState` held here; *how* iterations and evaluations are computed is the
    subclass's (:class:`LocalDriver` in this process, the Ray runner's inner-loop workers)."""

    throughput = "tasks"
    latest_return = None

    def __init__(self, trainer: Trainer, workers: int = 1):
        self.trainer, self.spec, self.workers = trainer, trainer.spec, workers
        self.state = TrainState(params={})

    def restore(self, checkpoint: Checkpoint | None) -> int:
        if checkpoint is None:
            self.state = self.trainer.init_state()
        else:
            state = train_state_from(checkpoint)
            opt_state = {name: value if name == "step" else value.to(self.trainer.device)
                         for name, value in state.opt_state.items()}
            self.state = TrainState(params=self.trainer._on_device(state.params),
                                    opt_state=opt_state, iteration=state.iteration)
        return self.state.iteration

    def advance(self, iterations: int) -> list[dict[str, float]]:
        self.state, per_step = self._advance(self.state, iterations)
        return per_step

    def _advance(self, state: TrainState, iterations: int) -> tuple[TrainState, list[dict[str, float]]]:
        raise NotImplementedError

    def evaluate(self, split: str) -> dict[str, float]:
        raise NotImplementedError

    def work_done(self) -> float:
        return float(self.state.iteration * self.spec.meta_batch_size)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(train_state_tensors(self.state), iteration=self.state.iteration)

    def artifact(self) -> tuple[dict[str, Tensor], dict]:
        return self.trainer.artifact(self.state)

    def close(self) -> None:
        pass


class LocalDriver(MetaLearningDriver):
    """A meta-learning job computed in this process (``metaserve train``, tests)."""

    def __init__(self, trainer: Trainer, *, progress: bool = False):
        super().__init__(trainer)
        self.show_progress = progress
        self.bar: _ProgressBar | None = None

    def _advance(self, state: TrainState, iterations: int) -> tuple[TrainState, list[dict[str, float]]]:
        if self.show_progress and self.bar is None:
            self.bar = _ProgressBar(self.spec.iterations, state.iteration)
        per_step = []
        for _ in range(iterations):
            state, metrics = self.trainer.step(state)
            per_step.append(metrics)
            if self.bar is not None:
                self.bar.update(metrics)
        return state, per_step

    def evaluate(self, split: str) -> dict[str, float]:
        return self.trainer.evaluate(self.state.params, split=split)

    def close(self) -> None:
        self.trainer.close()
        if self.bar is not None:
            self.bar.close()


class _ProgressBar:
    """A rich progress bar over meta-iterations (CLI only)."""

    def __init__(self, total: int, done: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("[bold]meta-train"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), TextColumn("{task.fields[loss]}"))
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=done, loss="")

    def update(self, metrics: dict[str, float]) -> None:
        loss = metrics.get("train/loss_after")
        self._progress.update(self._task, advance=1, loss="" if loss is None else f"loss_after {loss:.3f}")

    def close(self) -> None:
        self._progress.stop()
