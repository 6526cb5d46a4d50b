"""A sweep's driver: Ray Tune in the sweep's own supervisor actor.

The dispatcher claims a sweep's driver job like any job and starts a :class:`SweepSupervisor`
for it (:func:`start_sweep_supervisor`) instead of a :class:`JobSupervisor`: the same actor
shape (``num_cpus=0``, a ``memory`` request, heartbeats, an orphan exits, events streamed from
the generator :meth:`SweepSupervisor.run`), whose run is ``tune.Tuner(...).fit()`` — or, when the
sweep's experiment state exists (a previous attempt died), ``Tuner.restore(...,
resume_errored=True)``: finished trials are kept, unfinished ones resume from their own
checkpoints.

Each trial is a Tune function trainable (:func:`sweep_trial`) that runs the engine's one
schedule (:func:`~metaserve.workers.engine.loop.train_loop`) for its sampled spec, in its own
Tune actor with the spec's CPUs/GPUs, publishes its checkpoints and ``meta_init.*`` to the
artifact store under its own job id, and reports each evaluation window's validation metric
to Tune under ``iteration`` (ASHA's and the median rule's time axis), so the scheduler can stop
it. What it reports reaches the dispatcher as events of the sweep's stream, besides the job
events of :mod:`metaserve.workers.supervisor`:

- ``("trial_start", {trial_id, job_id, spec, name})``
- ``("trial_metrics", (job_id, step, {name: value}))``, ``("trial_progress", (job_id, {...}))``,
  ``("trial_files", (job_id, [ArtifactFile, ...]))``
- ``("trial_end", {job_id, status, message, error})``: succeeded, failed, or cancelled (stopped
  early by the scheduler)

At the end the best finished trial's ``meta_init.*`` and a ``sweep.json`` (the leaderboard) are
published as the driver job's artifacts. Cancelling kills the supervisor: Ray ends the trial
actors with it (their owner) and removes the trials' placement groups (the supervisor is a
detached actor, whose placement groups die with it), so nothing of the sweep keeps running or
keeps CPUs reserved.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import queue
import random
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray import tune

from metaserve.workers.engine.checkpoints import CHECKPOINT_DIRECTORY
from metaserve.workers.exceptions import DriverOutOfMemory, JobCancelled
from metaserve.workers.log_capture import capture_logs, release_logs
from metaserve.workers.runner import RunOptions
from metaserve.workers.object_store import StorageConfig, parse_s3_url
from metaserve.workers.supervisor import (EVENT_POLL_S, SCRATCH_PREFIX, JobSupervisor, node_info,
                                          remove_stale_scratch, wait_until_ready)
from metaserve.workers.sweep_spec import apply_config, longest_iterations

logger = logging.getLogger(__name__)

EXPERIMENTS_DIRECTORY = "_sweeps"
"""Under the artifact root: Tune's experiment state of each sweep (``_sweeps/<sweep_id>``)."""
EXPERIMENT_CHECKPOINT_S = "1"
"""How often Tune saves the experiment state (``TUNE_GLOBAL_CHECKPOINT_S``); a trial that ended
before the last save is not rerun on resume, and one after it is answered from the database."""
SWEEP_ARTIFACTS = ("meta_init.safetensors", "meta_init.json")
TERMINAL = ("succeeded", "failed", "cancelled")

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_SUPERVISOR: "SweepSupervisor | None" = None  # the one of this process (Tune's callbacks use it)


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


def shuffled(config: dict[str, Any]) -> bool:
    """Whether the sweep runs its grid's points in a drawn order (``search.shuffle``)."""
    return config["search"]["name"] == "grid" and bool(config["search"].get("shuffle"))


def grid_points(config: dict[str, Any]) -> list[dict[str, Any]]:
    """A shuffled grid's trials, in order: every point of the grid ``num_samples`` times,
    permuted by ``search.seed`` (a random order without one)."""
    paths = list(config["space"])
    values = [next(iter(config["space"][path].values())) for path in paths]
    points = [dict(zip(paths, point)) for _ in range(config["num_samples"])
              for point in itertools.product(*values)]
    random.Random(config["search"]["seed"]).shuffle(points)
    return points


def tune_samples(config: dict[str, Any]) -> int:
    """Tune's ``num_samples``: a shuffled grid's points are its samples, one each."""
    return len(grid_points(config)) if shuffled(config) else config["num_samples"]


def max_iterations(config: dict[str, Any]) -> int:
    """ASHA's ``max_t``: the most iterations a trial can run (:func:`longest_iterations`)."""
    return longest_iterations(config["spec"], config["space"])


def search_space(config: dict[str, Any]) -> dict[str, Any]:
    """The sweep's domains as Tune's (a grid search takes every domain as a grid; a shuffled
    one as choices, every trial of it a point given to the searcher, :func:`grid_points`)."""
    grid = config["search"]["name"] == "grid"
    space = {}
    for path, domain in config["space"].items():
        (kind, args), = domain.items()
        if shuffled(config):
            space[path] = tune.choice(list(args))
        elif kind == "grid" or (kind == "choice" and grid):
            space[path] = tune.grid_search(list(args))
        elif kind == "choice":
            space[path] = tune.choice(list(args))
        elif kind == "uniform":
            space[path] = tune.uniform(*args)
        elif kind == "loguniform":
            space[path] = tune.loguniform(*args)
        elif kind == "randint":
            space[path] = tune.randint(*args)
        else:
            space[path] = tune.qrandint(*args)
    return space


def search_algorithm(config: dict[str, Any]):  # noqa: ANN201 - a Tune search algorithm
    from ray.tune.search import BasicVariantGenerator

    search = config["search"]
    if search["name"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=search["seed"])
    if shuffled(config):
        return BasicVariantGenerator(points_to_evaluate=grid_points(config),
                                     random_state=search["seed"])
    return BasicVariantGenerator(random_state=search["seed"])


def scheduler_of(config: dict[str, Any]):  # noqa: ANN201 - a Tune trial scheduler
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    scheduler = config["scheduler"]
    if scheduler["name"] == "asha":
        # Rungs at grace_period × η^k below max_t (Tune's _Bracket); "iteration" is the
        # meta-iteration of the evaluation window a trial reports (sweep_trial).
        return ASHAScheduler(time_attr="iteration", max_t=max_iterations(config),
                             grace_period=scheduler["grace_period"],
                             reduction_factor=scheduler["reduction_factor"])
    if scheduler["name"] == "median":
        return MedianStoppingRule(time_attr="iteration", grace_period=scheduler["grace_period"],
                                  min_samples_required=scheduler["min_samples_required"])
    return FIFOScheduler()


def trial_resources(spec: dict[str, Any], options: RunOptions) -> dict[str, float]:
    """A trial's Tune resources: its spec's workers × CPUs (and GPUs) per worker; the trial
    computes them in its own process."""
    resources = spec["resources"]
    placed = {"cpu": resources["workers"] * resources["cpus_per_worker"]}
    gpus = resources["workers"] * resources["gpus_per_worker"]
    if gpus:
        placed["gpu" if options.gpu_resource == "GPU" else options.gpu_resource] = gpus
    return placed


def experiment_location(storage: StorageConfig, sweep_id: str):  # noqa: ANN201
    """``(storage_path, filesystem, experiment path)`` of the sweep's Tune state: beside the
    artifacts, so a dispatcher on any host resumes it."""
    if not storage.is_s3:
        root = Path(storage.root).resolve() / EXPERIMENTS_DIRECTORY
        root.mkdir(parents=True, exist_ok=True)
        return str(root), None, str(root / sweep_id)
    import pyarrow.fs

    bucket, prefix = parse_s3_url(storage.root)
    filesystem = pyarrow.fs.S3FileSystem(
        access_key=storage.access_key_id or None, secret_key=storage.secret_access_key or None,
        region=storage.region, endpoint_override=storage.endpoint_url or None)
    root = "/".join(part for part in (bucket, prefix, EXPERIMENTS_DIRECTORY) if part)
    return root, filesystem, f"{root}/{sweep_id}"


class _Stop(tune.Stopper):
    """Tune's stopper: everything stops once the supervisor is told to (state-free, so Tune
    may pickle it with the experiment)."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return _SUPERVISOR is not None and _SUPERVISOR._stop.is_set()


class _TrialEvents(tune.Callback):
    """Trial ends, as Tune sees them, to the supervisor of this process (module level, so Tune
    pickles it by reference with the experiment)."""

    def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
        if _SUPERVISOR is not None:
            _SUPERVISOR.trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
        if _SUPERVISOR is not None:
            _SUPERVISOR.trial_complete(trial.trial_id, trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
        if _SUPERVISOR is not None:
            _SUPERVISOR.trial_failed(trial.trial_id)


def sweep_trial(config: dict[str, Any], *, run: dict[str, Any], sink: Any,
                storage: StorageConfig, options: RunOptions) -> None:
    """One trial (a Tune function trainable): the sampled spec through the engine's schedule,
    its events to the sweep's supervisor ``sink``, each validation window's metric to Tune."""
    import torch

    from metaserve.workers.engine.loop import RunHooks, train_loop
    from metaserve.workers.engine.trainer import LocalDriver, Trainer
    from metaserve.workers.runner import worker_device
    from metaserve.workers.spec import JobSpec
    from metaserve.workers.object_store import open_store
    from metaserve.workers.tasks.uploaded import use_dataset_store

    metric = run["config"]["scheduler"]["metric"]
    trial_id = tune.get_context().get_trial_id()
    known = run["trials"].get(trial_id)
    if known is not None and known["status"] in TERMINAL:
        # Ended in an earlier attempt of the sweep (after Tune last saved its state): its
        # result is in the database; report it, train nothing.
        value = known["value"]
        tune.report({metric: math.nan if value is None else value,
                     "iteration": known["step"] or 0, "recorded": known["status"]})
        return
    document = apply_config(run["config"]["spec"], config)
    spec = JobSpec.model_validate(document)

    def call(kind: str, payload: Any) -> Any:
        # Waited for: the sweep's events stay in order (a threaded actor does not order calls).
        return ray.get(getattr(sink, kind).remote(*payload))

    job_id = call("trial_started", (trial_id, document, f"{run['name']}/{trial_id}"))
    torch.set_num_threads(spec.resources.torch_threads)
    use_dataset_store(options.storage)
    store = open_store(storage)
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{job_id}-p{os.getpid()}-"))

    def report(step: int, metrics: dict[str, float]) -> None:
        call("trial_event", ("trial_metrics", (job_id, step, metrics)))
        if metric in metrics and step < spec.iterations:
            tune.report({metric: metrics[metric], "iteration": step})

    hooks = RunHooks(
        report=report,
        progress=lambda progress: call("trial_event", ("trial_progress", (job_id, progress))),
        checkpointed=lambda paths: (call("trial_recorded", ()), call("trial_event", (
            "trial_files", (job_id, store.put(job_id, list(paths)))))),
        should_stop=lambda: call("trial_should_stop", (job_id,)),
    )
    device = worker_device(spec.resources.gpus_per_worker, options.gpu_resource,
                           torch.cuda.is_available())
    driver = LocalDriver(Trainer(spec, device=device))
    try:
        store.fetch_checkpoint(job_id, scratch / CHECKPOINT_DIRECTORY)
        final = train_loop(driver, scratch, hooks)
    except JobCancelled:  # its job was cancelled: the trial ends, the sweep goes on
        call("trial_event", ("trial_end", {"job_id": job_id, "status": "cancelled",
                                           "message": "cancelled"}))
        return
    except BaseException as error:
        text = str(error).strip().splitlines()
        call("trial_event", ("trial_error", (trial_id, f"{type(error).__name__}: {text[0]}"
                                             if text else type(error).__name__)))
        raise
    finally:
        driver.close()
        shutil.rmtree(scratch, ignore_errors=True)
    tune.report({metric: final[metric], "iteration": spec.iterations, "finished": True})


# --------------------------------------------------------------------------- the supervisor


class SweepSupervisor(JobSupervisor):
    """Runs one sweep's Tune driver (see the module docstring); a threaded actor whose
    ``trial_started``/``trial_event`` the trials call while :meth:`run` works."""

    def __init__(self, run: dict[str, Any], storage: StorageConfig, options: RunOptions,
                 memory_bytes: int):
        # Tune runs each trial in a directory of its own: a relative artifact root (the
        # embedded default's ./.metaserve/artifacts) is made absolute here, in the
        # supervisor's working directory, before it travels to the trials.
        storage = _absolute(storage)
        options = replace(options, storage=_absolute(options.storage))
        super().__init__(run["driver_job_id"], run["config"]["spec"], storage, options,
                         memory_bytes)
        self.run_info, self.storage = run, storage
        config = run["config"]
        self.metric, self.mode = config["scheduler"]["metric"], config["scheduler"]["mode"]
        self._lock = threading.Lock()
        # trial_id -> {"job_id", "status", "value", "step", "config"}
        self.trials: dict[str, dict[str, Any]] = {
            trial_id: {**known, "config": None} for trial_id, known in run["trials"].items()}
        self.errors: dict[str, str] = {}
        self.stopped_jobs: set[str] = set()  # trial jobs cancelled by their owner

    # ------------------------------------------------------------------ called by trials

    def trial_started(self, trial_id: str, spec: dict[str, Any], name: str) -> str:
        """The trial's job id (the same one on every attempt of the sweep)."""
        with self._lock:
            trial = self.trials.setdefault(trial_id, {"job_id": new_trial_job_id(),
                                                      "status": "running", "value": None,
                                                      "step": None})
            trial.update(status="running", config={path: _get(spec, path)
                                                   for path in self.run_info["config"]["space"]})
            self._emit("trial_start", {"trial_id": trial_id, "job_id": trial["job_id"],
                                       "spec": spec, "name": name})
            self._progress()
            return trial["job_id"]

    def stop_trials(self, job_ids: list[str]) -> None:
        """Stop these trials (their jobs were cancelled) at their next check."""
        self.stopped_jobs.update(job_ids)

    def trial_recorded(self) -> None:
        """Return once the dispatcher has written every event emitted so far: a trial publishes
        a checkpoint only then, so a resumed trial finds the metrics up to it recorded (as a
        job's driver does, :class:`JobSupervisor`)."""
        emitted = self._emitted
        while self._recorded < emitted:
            if self._stop.is_set():
                raise JobCancelled()
            time.sleep(EVENT_POLL_S / 4)

    def trial_should_stop(self, job_id: str) -> bool:
        return job_id in self.stopped_jobs or self._stop.is_set()

    def trial_event(self, kind: str, payload: Any) -> None:
        if kind == "trial_error":
            trial_id, text = payload
            self.errors[trial_id] = text
            return
        self._emit(kind, payload)

    # ------------------------------------------------------------------ called by Tune

    def trial_result(self, trial_id: str, result: dict) -> None:
        trial = self.trials.get(trial_id)
        if trial is not None and self.metric in result:
            trial.update(value=result[self.metric], step=result.get("iteration"))

    def trial_complete(self, trial_id: str, result: dict) -> None:
        with self._lock:
            trial = self.trials.get(trial_id)
            if trial is None or result.get("recorded"):
                return  # ended in an earlier attempt: recorded then
            value, step = result.get(self.metric), result.get("iteration")
            shown = f"{self.metric} {value:.4g}" if isinstance(value, float) else self.metric
            if result.get("finished"):
                status, message = "succeeded", f"finished: {shown}"
            else:
                status = "cancelled"
                message = (f"stopped early by {self.run_info['config']['scheduler']['name']} at "
                           f"iteration {step} ({shown})")
            trial.update(status=status, value=value, step=step)
            self._emit("trial_end", {"job_id": trial["job_id"], "status": status,
                                     "message": message})
            self._progress()

    def trial_failed(self, trial_id: str) -> None:
        with self._lock:
            trial = self.trials.get(trial_id)
            if trial is None:
                return
            error = self.errors.get(trial_id, "the trial's process died")
            trial.update(status="failed")
            self._emit("trial_end", {"job_id": trial["job_id"], "status": "failed",
                                     "message": f"failed: {error}", "error": error})
            self._progress()

    def _progress(self) -> None:
        counts: dict[str, int] = {}
        for trial in self.trials.values():
            counts[trial["status"]] = counts.get(trial["status"], 0) + 1
        ended = sum(counts.get(status, 0) for status in TERMINAL)
        self._emit("progress", {"iteration": ended, "total": self.run_info["config"]["trials"],
                                "trials": counts})

    # ------------------------------------------------------------------ the run

    def run(self) -> Iterator[tuple[str, Any]]:
        """Run the sweep to its end, yielding its events (see the module docstring)."""
        global _SUPERVISOR
        _SUPERVISOR = self
        self._last_heartbeat = time.monotonic()
        events, emit = self._events, self._emit
        driver = node_info()
        log_handler = capture_logs(lambda records: emit("logs", records),
                                   f"sweep driver pid {driver['pid']}")
        remove_stale_scratch()
        scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{self.job_id}-p{os.getpid()}-"))
        failure: list[BaseException] = []

        def drive() -> None:
            try:
                self._tune(scratch)
            except BaseException as error:  # noqa: BLE001 - re-raised by the generator below
                failure.append(error)
                if not isinstance(error, JobCancelled):
                    logger.error("the sweep's attempt failed", exc_info=error)
            finally:
                log_handler.flush()

        emit("placement", {"driver": driver, "workers": []})
        thread = threading.Thread(target=drive, name=f"sweep-{self.job_id}", daemon=True)
        thread.start()
        threading.Thread(target=self._watch, args=(thread,), daemon=True,
                         name=f"watch-{self.job_id}").start()
        try:
            while thread.is_alive() or not events.empty():
                try:
                    yield events.get(timeout=EVENT_POLL_S)
                except queue.Empty:
                    continue
            if self._out_of_memory is not None:
                raise DriverOutOfMemory(
                    f"out of memory: the sweep's driver held {self._out_of_memory / 2**20:.0f} "
                    f"MiB, more than the {self.memory_bytes / 2**20:.0f} MiB it asked for "
                    "(METASERVE_SWEEP_DRIVER_MEMORY_MB)")
            if failure:
                raise failure[0]
        finally:
            self._stop.set()
            thread.join()
            release_logs(log_handler)
            shutil.rmtree(scratch, ignore_errors=True)

    def _tune(self, scratch: Path) -> None:
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = EXPERIMENT_CHECKPOINT_S
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        config, sweep_id = self.run_info["config"], self.run_info["sweep_id"]
        trainable = tune.with_resources(
            tune.with_parameters(sweep_trial, run=self.run_info,
                                 sink=ray.get_runtime_context().current_actor,
                                 storage=self.storage, options=self.options),
            trial_resources(config["spec"], self.options))
        storage_path, filesystem, path = experiment_location(self.storage, sweep_id)
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
                    max_concurrent_trials=self.run_info.get("max_concurrent_trials")),
                run_config=tune.RunConfig(
                    name=sweep_id, storage_path=storage_path, storage_filesystem=filesystem,
                    stop=_Stop(), callbacks=[_TrialEvents()], verbose=0,
                    failure_config=tune.FailureConfig(max_failures=0)))
        tuner.fit()
        if self._stop.is_set():
            raise JobCancelled()
        self._publish(scratch)

    def _publish(self, scratch: Path) -> None:
        """The best finished trial's ``meta_init.*`` and ``sweep.json`` as the driver's
        artifacts; no finished trial fails the sweep."""
        sign = -1.0 if self.mode == "max" else 1.0
        board = sorted(
            ({"trial_id": trial_id, **trial} for trial_id, trial in self.trials.items()),
            key=lambda row: (not isinstance(row["value"], (int, float))
                             or not math.isfinite(row["value"]),
                             sign * row["value"] if isinstance(row["value"], (int, float))
                             and math.isfinite(row["value"]) else 0.0))
        finished = [row for row in board if row["status"] == "succeeded"
                    and isinstance(row["value"], (int, float)) and math.isfinite(row["value"])]
        if not finished:
            reasons = sorted(set(self.errors.values()))[:3]
            raise ValueError("no trial of the sweep finished" +
                             (f": {'; '.join(reasons)}" if reasons else ""))
        best = finished[0]
        paths = []
        for name in SWEEP_ARTIFACTS:
            opened = self.store.open(best["job_id"], name)
            if opened is None:
                raise FileNotFoundError(f"the best trial {best['job_id']} has no {name}")
            _, chunks = opened
            with open(scratch / name, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
            paths.append(scratch / name)
        summary = {"sweep_id": self.run_info["sweep_id"], "metric": self.metric,
                   "mode": self.mode, "best": best,
                   "trials": board}
        (scratch / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
        paths.append(scratch / "sweep.json")
        self._emit("files", self.store.put(self.job_id, paths))


def _absolute(storage: StorageConfig | None) -> StorageConfig | None:
    if storage is None or storage.is_s3:
        return storage
    return replace(storage, root=str(Path(storage.root).resolve()))


def _get(document: dict[str, Any], path: str) -> Any:
    node: Any = document
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


SUPERVISOR_NAMESPACE = "metaserve"
PREVIOUS_SUPERVISOR_EXIT_S = 30.0


def _end_previous_supervisor(name: str) -> None:
    """Kill the sweep supervisor called ``name`` if one still runs, and wait until it is gone."""
    deadline = time.monotonic() + PREVIOUS_SUPERVISOR_EXIT_S
    while time.monotonic() < deadline:
        try:
            previous = ray.get_actor(name, namespace=SUPERVISOR_NAMESPACE)
        except ValueError:
            return
        ray.kill(previous)
        time.sleep(0.2)
    raise RuntimeError(f"the previous sweep supervisor {name} did not end within "
                       f"{PREVIOUS_SUPERVISOR_EXIT_S:.0f} s")


def start_sweep_supervisor(run: dict[str, Any], storage: StorageConfig, options: RunOptions, *,
                           memory_bytes: int, should_stop: Callable[[], bool] = lambda: False):
    """Start the sweep's :class:`SweepSupervisor` and wait until it runs (as
    :func:`metaserve.workers.supervisor.start_supervisor` does for a job)."""
    # Detached: Tune reserves a placement group per trial from inside this actor, and a
    # placement group made by an ordinary actor lives as long as the *dispatcher's* Ray job,
    # so a killed sweep (cancel, dispatcher death) left its trials' CPUs reserved; a detached
    # actor's placement groups are removed when it dies. It still dies with its dispatcher:
    # the orphan watchdog ends a supervisor whose heartbeats stop (JobSupervisor).
    # A detached actor outlives a dispatcher killed with its Ray driver (until its orphan
    # watchdog ends it): named per sweep, so a resumed attempt first ends a previous one that
    # may still drive the same Tune experiment.
    name = f"metaserve-sweep-{run['driver_job_id']}"
    _end_previous_supervisor(name)
    actor = ray.remote(SweepSupervisor).options(
        num_cpus=0, memory=memory_bytes, max_restarts=0, max_concurrency=32,
        lifetime="detached", name=name, namespace=SUPERVISOR_NAMESPACE,
    ).remote(run, storage, options, memory_bytes)
    return wait_until_ready(actor, memory_bytes, should_stop, "the sweep's driver")
