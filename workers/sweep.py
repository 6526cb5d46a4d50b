"""The sweep job kind: Ray Tune in the sweep's driver job's supervisor.

The dispatcher claims a sweep's driver job like any job and starts its one
:class:`~metaserve.workers.supervisor.JobSupervisor`, whose run for this kind
(:mod:`metaserve.workers.registry`) is :func:`run_sweep`: ``tune.Tuner(...).fit()`` — or, when
the sweep's experiment state exists (a previous attempt died), ``Tuner.restore(...,
resume_errored=True)``: finished trials are kept, unfinished ones resume from their own
checkpoints.

Each trial is a job: a Tune function trainable (:func:`sweep_trial`) that builds its sampled
spec, checks it against the server's per-job limits, and trains it with the registry's
:func:`~metaserve.workers.registry.run_job` (so RL trials and sharded trials run as any job:
its worker actors in the trial's placement group, :func:`~metaserve.workers.sweep_search.trial_resources`).
It reports to the supervisor in the one event vocabulary keyed by its own job id
(:mod:`metaserve.workers.job_run`: ``started``, ``metrics``, ``progress``, ``placement``,
``files``, ``ended``), publishes its checkpoints and final artifact under its own job id, and
reports each evaluation window's metric to Tune under ``iteration`` (ASHA's and the median
rule's time axis), so the scheduler can stop it; Tune's callbacks here end it (``ended``:
succeeded, failed, or cancelled when stopped early).

At the end the best finished trial's final artifact and a ``sweep.json`` (the leaderboard) are
published as the driver job's artifacts. Trials are selected by the sweep's validation metric;
beside it each finished trial's held-out test score is reported (its final value of the
metric's ``test/`` counterpart, :func:`~metaserve.workers.sweep_spec.held_out_score`): from its
final evaluation in this attempt, from the database for a trial an earlier attempt recorded.
Cancelling kills the supervisor: Ray ends the trial actors with it (their owner) and removes the
trials' placement groups (the supervisor of a sweep is detached, so its placement groups die
with it), so nothing of the sweep keeps running or keeps CPUs reserved.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from metaserve.workers.cost import estimate, limit_problems
from metaserve.workers.engine.checkpoints import CHECKPOINT_DIRECTORY
from metaserve.workers.engine.final_artifact import artifact_files, artifact_kind
from metaserve.workers.engine.loop import RunHooks
from metaserve.workers.exceptions import JobCancelled, TrialOverLimits
from metaserve.workers.job_run import SCRATCH_PREFIX, JobContext, JobRun, SweepRun, node_info
from metaserve.workers.object_store import StorageConfig, open_store
from metaserve.workers.runner import RunOptions
from metaserve.workers.spec import JobSpec
from metaserve.workers.sweep_search import (experiment_location, scheduler_of, search_algorithm,
                                            search_space, trial_resources, tune_samples)
from metaserve.workers.sweep_spec import STOPPED_EARLY, held_out_metric, held_out_score, trial_spec

logger = logging.getLogger(__name__)

EXPERIMENT_CHECKPOINT_S = "1"
"""How often Tune saves the experiment state (``TUNE_GLOBAL_CHECKPOINT_S``); a trial that ended
before the last save is not rerun on resume, and one after it is answered from the database."""
TERMINAL = ("succeeded", "failed", "cancelled")

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DRIVER: "_TuneDriver | None" = None  # the sweep this process drives (Tune's callbacks use it)
Train = Callable[[JobSpec, Path, RunHooks, RunOptions], dict[str, float]]


def new_trial_job_id() -> str:
    """A 26-character ULID-shaped job id (48-bit milliseconds + 80 random bits, Crockford
    base32), the shape of :func:`metaserve.service.ids.new_id`, so trials sort by start."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


# --------------------------------------------------------------------------- Tune's side


class _Stop(tune.Stopper):
    """Tune's stopper: everything stops once the supervisor is told to (state-free, so Tune
    may pickle it with the experiment)."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return _DRIVER is not None and _DRIVER.hooks.should_stop()


class _TrialEvents(tune.Callback):
    """Trials as Tune sees them, to the sweep this process drives (module level, so Tune
    pickles it by reference with the experiment)."""

    def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001
        if _DRIVER is not None:
            _DRIVER.trial_started(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
        if _DRIVER is not None:
            _DRIVER.trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
        if _DRIVER is not None:
            _DRIVER.trial_complete(trial.trial_id, trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
        if _DRIVER is not None:
            try:
                error = trial.get_pickled_error()
            except Exception:  # noqa: BLE001 - unreadable: the trial's end says it died
                error = None
            _DRIVER.trial_failed(trial.trial_id, trial.last_result or {}, error)


def _first_line(error: BaseException) -> str:
    for _ in range(8):  # Ray's wrappers: the trial's own exception
        cause = getattr(error, "cause", None)
        if not isinstance(cause, BaseException) or cause is error:
            break
        error = cause
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def sweep_trial(config: dict[str, Any], *, sweep: SweepRun, supervisor: Any,
                options: RunOptions, train: Train, attempt: int) -> None:
    """One trial (a Tune function trainable): a job of the sweep, trained by ``train`` for its
    sampled spec; its events to the sweep's ``supervisor``, each validation window's metric to
    Tune. It publishes to the store as the sweep's ``attempt`` (a trial runs only within its
    sweep's attempts, so that number only grows: a stale sweep attempt's trials are fenced)."""
    metric = sweep.config["scheduler"]["metric"]
    trial_id = tune.get_context().get_trial_id()
    known = sweep.trials.get(trial_id)
    if known is not None and known.status in TERMINAL:
        # Ended in an earlier attempt of the sweep (after Tune last saved its state): its
        # result is in the database; report it, train nothing.
        tune.report({metric: math.nan if known.value is None else known.value,
                     "iteration": known.step or 0, "recorded": known.status,
                     "job_id": known.job_id})
        return
    spec = trial_spec(sweep.config["spec"], config)  # Tune's sample: the edge of this spec
    job_id = known.job_id if known is not None else new_trial_job_id()

    def call(method: str, *args: Any) -> Any:
        # Waited for: the job's events stay in order (a threaded actor does not order calls).
        return ray.get(getattr(supervisor, method).remote(*args))

    def event(kind: str, payload: Any) -> None:
        call("event", job_id, kind, payload)

    event("started", {"key": trial_id, "spec": spec, "name": f"{sweep.name}/{trial_id}"})
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{job_id}-p{os.getpid()}-"))
    try:
        final = _train_trial(spec, job_id, scratch, metric, sweep, options, train, call, attempt)
    except JobCancelled:  # its job was cancelled: the trial ends, the sweep goes on
        event("ended", {"status": "cancelled", "message": "cancelled"})
        return
    except Exception as error:  # not SystemExit: Tune's early stop ends the thread with it
        text = _first_line(error)  # the job's error (Tune's callback may not know its job id)
        event("ended", {"status": "failed", "message": f"failed: {text}", "error": text})
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    test_metric, _ = held_out_metric(metric)
    held_out = {"test_value": final[test_metric]} if test_metric in final else {}
    tune.report({metric: final[metric], "iteration": spec.iterations, "finished": True,
                 "job_id": job_id, **held_out})


def _train_trial(spec: JobSpec, job_id: str, scratch: Path, metric: str, sweep: SweepRun,
                 options: RunOptions, train: Train, call: Callable[..., Any],
                 attempt: int) -> dict[str, float]:
    """Check the trial's spec against the per-job limits, then train it as its job (resumed
    from its last checkpoint); its final evaluation."""
    if sweep.limits is not None:
        problems = limit_problems(spec, estimate(spec), sweep.limits)
        if problems:
            raise TrialOverLimits("the trial is larger than this server accepts: " + "; ".join(
                f"{field}: {text}" for field, text in problems.items()))
    store, driver = open_store(options.storage), node_info()

    def event(kind: str, payload: Any) -> None:
        call("event", job_id, kind, payload)

    def report(step: int, metrics: dict[str, float]) -> None:
        event("metrics", (step, metrics))
        if metric in metrics and step < spec.iterations:
            tune.report({metric: metrics[metric], "iteration": step, "job_id": job_id})

    def checkpointed(paths: list[Path]) -> None:
        call("wait_recorded")
        event("files", store.put(job_id, list(paths), attempt=attempt))

    hooks = RunHooks(report=report, progress=lambda progress: event("progress", progress),
                     checkpointed=checkpointed, should_stop=lambda: call("should_stop", job_id),
                     workers_ready=lambda workers: event("placement", {"driver": driver,
                                                                       "workers": workers}))
    store.fetch_checkpoint(job_id, scratch / CHECKPOINT_DIRECTORY)
    return train(spec, scratch, hooks, options)


class _TuneDriver:
    """One sweep's Tune run, in its supervisor's process: the trials as Tune sees them (their
    job ids, status and last value), their ends, the sweep's progress and its artifacts."""

    def __init__(self, run: JobRun, context: JobContext, train: Train):
        assert run.sweep is not None
        self.run, self.sweep, self.context, self.train = run, run.sweep, context, train
        self.hooks = context.hooks
        scheduler = self.sweep.config["scheduler"]
        self.metric, self.mode = scheduler["metric"], scheduler["mode"]
        self._lock = threading.Lock()
        # trial_id -> {"job_id", "status", "value", "step", "test_value"}; a trial an earlier
        # attempt recorded comes with its values as the database has them.
        self.trials: dict[str, dict[str, Any]] = {
            trial_id: {"job_id": trial.job_id, "status": trial.status, "value": trial.value,
                       "step": trial.step, "test_value": trial.test_value}
            for trial_id, trial in self.sweep.trials.items()}
        self.errors: dict[str, str] = {}

    def _trial(self, trial_id: str, result: dict) -> dict[str, Any]:
        trial = self.trials.setdefault(trial_id, {"job_id": None, "status": "running",
                                                  "value": None, "step": None,
                                                  "test_value": None})
        if result.get("job_id"):
            trial["job_id"] = result["job_id"]
        return trial

    def _end(self, trial: dict[str, Any], status: str, message: str,
             error: str | None = None) -> None:
        trial["status"] = status
        if trial["job_id"] is not None:
            self.context.emit(trial["job_id"], "ended",
                              {"status": status, "message": message, "error": error})
        self._progress()

    def trial_started(self, trial_id: str) -> None:
        with self._lock:
            trial = self._trial(trial_id, {})
            if trial["status"] not in TERMINAL:
                trial["status"] = "running"
            self._progress()

    def trial_result(self, trial_id: str, result: dict) -> None:
        with self._lock:
            trial = self._trial(trial_id, result)
            if self.metric in result:
                trial.update(value=result[self.metric], step=result.get("iteration"))

    def trial_complete(self, trial_id: str, result: dict) -> None:
        with self._lock:
            trial = self._trial(trial_id, result)
            if result.get("recorded"):
                trial["status"] = result["recorded"]  # ended in an earlier attempt: recorded then
                return
            value, step = result.get(self.metric), result.get("iteration")
            trial.update(value=value, step=step, test_value=result.get("test_value"))
            shown = f"{self.metric} {value:.4g}" if isinstance(value, float) else self.metric
            if result.get("finished"):
                held_out = held_out_score(self.metric, "succeeded", trial["test_value"])
                if held_out["test_value"] is not None:
                    shown += f", held-out {held_out['test_metric']} {held_out['test_value']:.4g}"
                self._end(trial, "succeeded", f"finished: {shown}")
            else:
                self._end(trial, "cancelled", f"{STOPPED_EARLY}"
                          f"{self.sweep.config['scheduler']['name']} at iteration {step} ({shown})")

    def trial_failed(self, trial_id: str, result: dict, error: BaseException | None) -> None:
        with self._lock:
            trial = self._trial(trial_id, result)
            text = _first_line(error) if error is not None else "the trial's process died"
            self.errors[trial_id] = text
            self._end(trial, "failed", f"failed: {text}", text)

    def _progress(self) -> None:
        counts: dict[str, int] = {}
        for trial in self.trials.values():
            counts[trial["status"]] = counts.get(trial["status"], 0) + 1
        ended = sum(counts.get(status, 0) for status in TERMINAL)
        self.hooks.progress({"iteration": ended, "total": self.sweep.config["trials"],
                             "trials": counts})

    def fit(self, scratch: Path) -> None:
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = EXPERIMENT_CHECKPOINT_S
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        config, sweep_id = self.sweep.config, self.sweep.sweep_id
        # Tune runs each trial in a directory of its own: a relative artifact root (the
        # embedded default's ./.metaserve/artifacts) is made absolute here, in the
        # supervisor's working directory, before it travels to the trials.
        options = replace(self.context.options, storage=_absolute(self.context.options.storage))
        trainable = tune.with_resources(
            tune.with_parameters(sweep_trial, sweep=self.sweep,
                                 supervisor=self.context.supervisor, options=options,
                                 train=self.train, attempt=self.run.fence),
            trial_resources(self.run.spec, options))
        storage_path, filesystem, path = experiment_location(options.storage, sweep_id)
        if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
            logger.info("resuming the sweep from its Tune state", extra={"sweep_id": sweep_id})
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True,
                                       storage_filesystem=filesystem)
        else:
            tuner = tune.Tuner(
                trainable, param_space=search_space(config),
                tune_config=tune.TuneConfig(
                    metric=self.metric, mode=self.mode, search_alg=search_algorithm(config),
                    scheduler=scheduler_of(config), num_samples=tune_samples(config),
                    max_concurrent_trials=self.sweep.max_concurrent_trials),
                run_config=tune.RunConfig(
                    name=sweep_id, storage_path=storage_path, storage_filesystem=filesystem,
                    stop=_Stop(), callbacks=[_TrialEvents()], verbose=0,
                    failure_config=tune.FailureConfig(max_failures=0)))
        tuner.fit()
        if self.hooks.should_stop():
            raise JobCancelled()
        self._publish(scratch)

    def _publish(self, scratch: Path) -> None:
        """The best finished trial's final artifact and ``sweep.json`` as the driver's
        artifacts; no finished trial fails the sweep."""
        sign = -1.0 if self.mode == "max" else 1.0

        def finite(value: Any) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value)

        board = sorted(({"trial_id": trial_id, **trial,
                         **held_out_score(self.metric, trial["status"], trial["test_value"])}
                        for trial_id, trial in self.trials.items()),
                       key=lambda row: (not finite(row["value"]),
                                        sign * row["value"] if finite(row["value"]) else 0.0))
        finished = [row for row in board if row["status"] == "succeeded" and finite(row["value"])]
        if not finished:
            reasons = sorted(set(self.errors.values()))[:3]
            raise ValueError("no trial of the sweep finished" +
                             (f": {'; '.join(reasons)}" if reasons else ""))
        best, store, paths = finished[0], self.context.store, []
        for name in artifact_files(artifact_kind(self.run.spec)):
            opened = store.open(best["job_id"], name)
            if opened is None:
                raise FileNotFoundError(f"the best trial {best['job_id']} has no {name}")
            _, chunks = opened
            with open(scratch / name, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
            paths.append(scratch / name)
        test_metric, why = held_out_metric(self.metric)
        # Selected by the validation metric; test_value, on tasks no selection used, is the
        # unbiased estimate of the best trial's score.
        summary = {"sweep_id": self.sweep.sweep_id, "metric": self.metric, "mode": self.mode,
                   "test_metric": test_metric, "test_metric_note": why,
                   "best": best, "trials": board}
        (scratch / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
        paths.append(scratch / "sweep.json")
        self.context.emit(self.run.job_id, "files", store.put(self.run.job_id, paths,
                                                              attempt=self.run.fence))


def run_sweep(run: JobRun, job_dir: Path, context: JobContext, *, train: Train) -> None:
    """Run the sweep ``run`` drives (the sweep kind's run, :mod:`metaserve.workers.registry`):
    Tune to the end, each trial trained by ``train``; then its artifacts."""
    global _DRIVER
    driver = _DRIVER = _TuneDriver(run, context, train)
    try:
        driver.fit(job_dir)
    finally:
        _DRIVER = None


def _absolute(storage: StorageConfig | None) -> StorageConfig | None:
    if storage is None or storage.is_s3:
        return storage
    return replace(storage, root=str(Path(storage.root).resolve()))

