"""A meta-learning job on Ray (:class:`MetaLearningRayDriver`): the outer loop in the job's
driver process, the inner loops on Ray actors; and what every Ray driver shares (the server's
:class:`RunOptions`, placement: :func:`actor_resources`, :func:`check_schedulable`,
:func:`worker_device`). :func:`metaserve.workers.registry.run_job` picks the driver of a job's
kind and runs it on :func:`~metaserve.workers.engine.loop.train_loop`'s schedule.

The driver owns the meta-parameters and the outer optimizer state; the schedule (log,
evaluate, checkpoint) is the loop's. ``resources.workers`` :class:`InnerLoopWorker` actors each
hold a :class:`Trainer` built from the same spec; every meta-iteration the meta-batch is split
into contiguous shards, one per worker, each worker samples its own tasks from the
counter-based seed, adapts them vectorized and returns the summed meta-gradient. The shards
are combined in worker order, so a run is a pure function of (spec, seed, worker count).

With a single worker the whole segment between two reporting points runs on the actor
(`run_segment`), which removes the per-iteration round trip, and the next segment is queued
behind it (`run_ahead`), so the worker does not wait for the driver between segments; the
arithmetic is the same as a one-shard step, so the result is the same bits.

Faults: a worker that dies (process killed, node removed) is replaced and the lost work is
recomputed from the same parameters, so the final parameters do not change. The driver
itself keeps nothing that a checkpoint does not hold: if its process dies, the next
attempt resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import ray
import torch
from ray.exceptions import RayActorError

from metaserve.workers.engine.state import ShardResult, TrainState
from metaserve.workers.engine.loop import RunHooks, next_stop
from metaserve.workers.engine.trainer import MetaLearningDriver, Trainer
from metaserve.workers.exceptions import JobCancelled, PlacementTimeout, Unschedulable, WorkerLost
from metaserve.workers.log_capture import forward_logs_to
from metaserve.workers.spec import JobSpec
from metaserve.workers.object_store import StorageConfig
from metaserve.workers.tasks.uploaded import use_dataset_store

logger = logging.getLogger(__name__)

WORKER_READY_TIMEOUT_S = 60.0
PENDING_REPORT_S = 5.0  # placement pending this long is reported in the job's progress
POLL_S = 0.25
MAX_WORKER_REPLACEMENTS = 20
# Inner-loop workers keep Ray's worker niceness (15): where the API server shares a host with
# them (the embedded default, a head node), the API's requests come before training
# (docs/RELIABILITY.md). A job's training competes with other jobs' at the same niceness.


DRIVER_GROUP_PREFIX = "metaserve-driver-"
"""On an autoscaling cluster a job's driver is placed in a placement group of its own, named
this + its supervisor's name (:func:`~metaserve.workers.supervisor.start_supervisor`)."""


def remove_job_placement_groups(supervisor_name: str) -> int:
    """Remove the placement groups of the job whose supervisor is called ``supervisor_name``
    that are still reserved: its workers' (the supervisor was killed before it released them)
    and, on an autoscaling cluster, its driver's own (:func:`~metaserve.workers.supervisor.
    start_supervisor`); how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    workers, driver, removed = f"metaserve-workers-{supervisor_name}-", \
        f"{DRIVER_GROUP_PREFIX}{supervisor_name}", 0
    for group_id, info in ray.util.placement_group_table().items():
        name = info.get("name", "")
        if (name.startswith(workers) or name == driver) and info.get("state") != "REMOVED":
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
                removed += 1
            except Exception:  # noqa: BLE001 - removed meanwhile
                pass
    return removed


@dataclass(frozen=True)
class RunOptions:
    """How the cluster is set up, from the server's settings (plain data for Ray actors)."""

    gpu_resource: str = "GPU"
    """The Ray resource a job's ``gpus_per_worker`` asks for: ``GPU``, or a custom resource
    that stands in for GPUs (e.g. ``gpu_slot`` on CPU-only test nodes)."""

    storage: StorageConfig | None = None
    """The artifact store uploaded datasets are read from (:mod:`metaserve.workers.tasks.uploaded`)."""

    log_sink: Any = None
    """The job's supervisor actor, which inner-loop workers send their log records to
    (:func:`metaserve.workers.log_capture.forward_logs_to`); None: they keep them."""

    autoscaling: bool = False
    """The cluster autoscales: no veto against its current totals; a driver or a placement
    group stays pending (the autoscaler sees the demand) for up to :attr:`pending_timeout_s`."""

    pending_timeout_s: float = 900.0
    """With :attr:`autoscaling`: how long placement may stay pending before the job fails
    (:class:`PlacementTimeout`)."""

    def placement_timeout_s(self) -> float:
        """How long a driver or a job's workers may wait to be placed."""
        return self.pending_timeout_s if self.autoscaling else WORKER_READY_TIMEOUT_S


def worker_device(gpus_per_worker: float, gpu_resource: str, cuda_available: bool) -> str:
    """The torch device of an inner-loop worker, decided on the worker's own node.

    A worker that asked for no GPU computes on the CPU. One that was given Ray's ``GPU``
    resource must see CUDA (else the node is misconfigured: an error, not a silent CPU run).
    One placed by a stand-in resource uses CUDA when its node has it, else the CPU.
    """
    if gpus_per_worker <= 0:
        return "cpu"
    if cuda_available:
        return "cuda"
    if gpu_resource == "GPU":
        raise RuntimeError("worker was given a GPU but torch sees no CUDA device")
    return "cpu"


def worker_bundle(resources, options: RunOptions) -> dict[str, float]:  # noqa: ANN001 - a ResourcesSpec
    """The placement-group bundle of one inner-loop worker: what :func:`actor_resources` asks."""
    bundle = {"CPU": float(resources.cpus_per_worker)}
    if resources.gpus_per_worker > 0:
        bundle[options.gpu_resource] = float(resources.gpus_per_worker)
    return {name: amount for name, amount in bundle.items() if amount > 0}


def actor_resources(resources, options: RunOptions) -> dict:  # noqa: ANN001 - a ResourcesSpec
    """Ray options placing one worker actor of a job: ``cpus_per_worker`` CPUs and
    ``gpus_per_worker`` of the server's GPU resource (Ray's ``GPU`` or its stand-in)."""
    gpus: dict = {}
    if resources.gpus_per_worker > 0:
        gpus = ({"num_gpus": resources.gpus_per_worker} if options.gpu_resource == "GPU"
                else {"resources": {options.gpu_resource: resources.gpus_per_worker}})
    return dict(num_cpus=resources.cpus_per_worker, **gpus)


class InnerLoopWorker:
    """A Ray actor adapting one shard of every meta-batch (see module docstring)."""

    def __init__(self, spec: JobSpec, options: RunOptions, torch_threads: int):
        import os

        forward_logs_to(options.log_sink, f"worker pid {os.getpid()}")
        torch.set_num_threads(max(1, torch_threads))
        use_dataset_store(options.storage)
        device = worker_device(spec.resources.gpus_per_worker, options.gpu_resource,
                               torch.cuda.is_available())
        self.trainer = Trainer(spec, device=device)
        self.device = device

    def ready(self) -> dict:
        import os

        return {"pid": os.getpid(), "device": self.device,
                "node": ray.get_runtime_context().get_node_id()}

    def shard_step(self, params: dict, iteration: int, task_indices: list[int]) -> ShardResult:
        return self.trainer.shard_step(params, iteration, task_indices)

    def run_segment(self, state: TrainState, iterations: int) -> tuple[TrainState, list[dict]]:
        """Run ``iterations`` whole steps here; return the new state and per-step metrics."""
        metrics = []
        for _ in range(iterations):
            state, step_metrics = self.trainer.step(state)
            metrics.append(step_metrics)
        self.last_state = state
        return _to_cpu_state(state), metrics

    def run_ahead(self, iterations: int) -> tuple[TrainState, list[dict]]:
        """:meth:`run_segment` from the state the previous segment on this worker ended at
        (the driver queues it behind that segment, so the worker never waits for the driver)."""
        return self.run_segment(self.last_state, iterations)

    def evaluate(self, params: dict, split: str) -> dict[str, float]:
        return self.trainer.evaluate(params, split=split)


def _to_cpu_state(state: TrainState) -> TrainState:
    return TrainState(
        params={k: v.detach().cpu() for k, v in state.params.items()},
        opt_state={k: v.detach().cpu() for k, v in state.opt_state.items()},
        iteration=state.iteration,
    )


def shard_ranges(meta_batch_size: int, workers: int) -> list[list[int]]:
    """Contiguous task-index shards, as even as possible, in worker order."""
    workers = min(workers, meta_batch_size)
    base, extra = divmod(meta_batch_size, workers)
    shards, start = [], 0
    for w in range(workers):
        size = base + (1 if w < extra else 0)
        shards.append(list(range(start, start + size)))
        start += size
    return shards


def check_schedulable(spec: JobSpec, options: RunOptions | None = None) -> None:
    """Raise :class:`Unschedulable` when the cluster as a whole can never fit the job; on an
    autoscaling cluster nothing is vetoed (a node that fits may yet come up)."""
    options = options or RunOptions()
    if options.autoscaling:
        return
    gpu_resource = options.gpu_resource
    resources = spec.resources
    total = ray.cluster_resources()
    need_cpu = resources.workers * resources.cpus_per_worker
    need_gpu = resources.workers * resources.gpus_per_worker
    have_cpu = total.get("CPU", 0.0)
    have_gpu = total.get(gpu_resource, 0.0)
    gpu_name = "GPU(s)" if gpu_resource == "GPU" else f"GPU(s) ({gpu_resource})"
    problems = []
    if need_gpu > have_gpu + 1e-9:
        problems.append(f"{need_gpu:g} {gpu_name} asked ({resources.workers} workers × "
                        f"{resources.gpus_per_worker:g}), cluster has {have_gpu:g}")
    if need_cpu > have_cpu + 1e-9:
        problems.append(f"{need_cpu:g} CPU(s) asked ({resources.workers} workers × "
                        f"{resources.cpus_per_worker:g}), cluster has {have_cpu:g}")
    if problems:
        raise Unschedulable("waiting for resources: " + "; ".join(problems))


@dataclass
class _WorkerPool:
    """A job's inner-loop workers, placed as one gang: a placement group of one bundle per
    worker (PACK: on as few nodes as fit), so the job gets all its workers or waits holding
    nothing; two multi-worker jobs never each hold half of what they need. A replaced worker
    goes into its predecessor's bundle (Ray re-places the bundles of a lost node)."""

    spec: JobSpec
    hooks: RunHooks
    options: RunOptions = field(default_factory=RunOptions)
    actors: list = field(default_factory=list)
    info: list = field(default_factory=list)
    replacements: int = 0
    group: Any = None

    def _options(self, index: int):
        options = dict(max_restarts=0, max_concurrency=1,
                       **actor_resources(self.spec.resources, self.options))
        if self.group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=index)
        return options

    def _new_actor(self, index: int):
        threads = max(1, int(self.spec.resources.cpus_per_worker))
        cls = ray.remote(InnerLoopWorker).options(**self._options(index))
        return cls.remote(self.spec, self.options, threads)  # Ray pickles the typed spec

    def start(self, count: int, iteration: int = 0) -> None:
        self._reserve(count, iteration)
        self.actors = [self._new_actor(index) for index in range(count)]
        self.info = [{} for _ in range(count)]
        self._wait_ready(list(range(count)))

    def _reserve(self, count: int, iteration: int) -> None:
        """Reserve the workers' placement group and wait until all of it is placed (the job
        is at ``iteration``, for its progress while it waits)."""
        from ray.util.placement_group import get_current_placement_group, placement_group

        bundle = worker_bundle(self.spec.resources, self.options)
        if not bundle or get_current_placement_group() is not None:
            # Nothing to reserve, or already inside a gang: a sweep's trial, whose placement
            # group (a bundle per worker) Tune reserved; its workers go into it.
            return
        # Named after the supervisor running it (metaserve-job-<id>): a placement group made in
        # an ordinary actor lives as long as the dispatcher's Ray job, so a supervisor killed
        # before its shutdown() would leave it reserved; remove_job_placement_groups ends it.
        owner = ray.get_runtime_context().get_actor_name() or "driver"
        self.group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK",
                                     name=f"metaserve-workers-{owner}-{uuid.uuid4().hex[:8]}")
        ready = self.group.ready()
        timeout = self.options.placement_timeout_s()
        started = time.monotonic()
        waiting = f"{count} worker(s) × " + ", ".join(f"{amount:g} {name}" for name, amount in bundle.items())
        reported = False
        while not ray.wait([ready], timeout=POLL_S)[0]:
            if self.hooks.should_stop():
                raise JobCancelled()
            waited = time.monotonic() - started
            if not reported and waited > PENDING_REPORT_S:
                reported = True  # said once: the job's progress shows it until it trains
                self.hooks.progress({"iteration": iteration, "total": self.spec.iterations,
                                     "waiting": f"waiting for placement: {waiting}"})
            if waited > timeout:
                if self.options.autoscaling:
                    raise PlacementTimeout(
                        f"no placement for the job's workers ({waiting}) within the pending "
                        f"timeout of {timeout:.0f} s (placement_pending_timeout_s): the cluster "
                        "did not scale up to fit them")
                raise Unschedulable(
                    "waiting for resources: inner-loop workers could not be placed within "
                    f"{timeout:.0f} s (cluster busy or short of {waiting})")

    def _wait_ready(self, indices: list[int]) -> None:
        should_stop = self.hooks.should_stop
        pending = {self.actors[i].ready.remote(): i for i in indices}
        deadline = time.monotonic() + self.options.placement_timeout_s()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
            for ref in done:
                index = pending.pop(ref)
                try:
                    self.info[index] = ray.get(ref)
                    logger.info("inner-loop worker ready", extra={"worker": index, **self.info[index]})
                except RayActorError:
                    self.replace(index)
                    pending[self.actors[index].ready.remote()] = index
            if should_stop():
                raise JobCancelled()
            if pending and time.monotonic() > deadline:
                raise Unschedulable(
                    "waiting for resources: inner-loop workers could not be placed within "
                    f"{self.options.placement_timeout_s():.0f} s (cluster busy or short of "
                    f"{self.spec.resources.cpus_per_worker:g} CPU / "
                    f"{self.spec.resources.gpus_per_worker:g} GPU per worker)")
        self.hooks.workers_ready([dict(info) for info in self.info])

    def replace(self, index: int) -> None:
        self.replacements += 1
        if self.replacements > MAX_WORKER_REPLACEMENTS:
            raise WorkerLost(f"inner-loop workers died {self.replacements} times; giving up")
        logger.warning("replacing dead inner-loop worker", extra={"worker": index})
        try:
            ray.kill(self.actors[index])
        except Exception:  # already gone
            pass
        self.actors[index] = self._new_actor(index)

    def restart(self, index: int) -> None:
        """Replace the dead worker ``index`` and wait until its successor is ready."""
        self.replace(index)
        self._wait_ready([index])

    def call(self, calls: Sequence[tuple[int, str, tuple]]) -> list:
        """Run ``(worker index, method, args)`` calls; replace dead workers and redo their call.

        Returns the results in the order of ``calls``.
        """
        should_stop = self.hooks.should_stop
        results: list = [None] * len(calls)
        pending = {}
        for slot, (index, method, args) in enumerate(calls):
            pending[getattr(self.actors[index], method).remote(*args)] = slot
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
            for ref in done:
                slot = pending.pop(ref)
                index, method, args = calls[slot]
                try:
                    results[slot] = ray.get(ref)
                except RayActorError as error:
                    logger.warning("inner-loop worker died; recomputing its shard",
                                   extra={"worker": index, "error": str(error)[:200]})
                    self.restart(index)
                    pending[getattr(self.actors[index], method).remote(*args)] = slot
            if pending and should_stop():
                raise JobCancelled()
        return results

    def wait(self, ref):  # noqa: ANN001, ANN201 - an ObjectRef and its value
        """The value of one call's ``ref``; raises RayActorError if its worker died (the
        caller recomputes), JobCancelled when the job must stop."""
        while not ray.wait([ref], timeout=POLL_S)[0]:
            if self.hooks.should_stop():
                raise JobCancelled()
        return ray.get(ref)

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.actors = []
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.group)
            except Exception:  # noqa: BLE001 - already removed (its job's Ray driver ended)
                pass
            self.group = None


class MetaLearningRayDriver(MetaLearningDriver):
    """A meta-learning job's :class:`~metaserve.workers.engine.loop.Driver` on Ray: its
    iterations sharded over ``resources.workers`` inner-loop workers (see the module
    docstring)."""

    def __init__(self, spec: JobSpec, hooks: RunHooks, options: RunOptions):
        use_dataset_store(options.storage)
        check_schedulable(spec, options)
        # The local trainer validates the spec (e.g. the dataset exists) before any actor starts
        # and takes the outer steps of a sharded meta-batch.
        super().__init__(Trainer(spec, device="cpu"))
        self.hooks = hooks
        self.shards = shard_ranges(spec.meta_batch_size, spec.resources.workers)
        self.workers = len(self.shards)
        self.pool = _WorkerPool(spec, hooks, options)
        self.ahead: _Ahead | None = None

    def restore(self, checkpoint) -> int:  # noqa: ANN001 - a Checkpoint or None
        iteration = super().restore(checkpoint)
        self.ahead = None
        self.pool.start(len(self.shards), iteration)
        return iteration

    def _advance(self, state: TrainState, iterations: int) -> tuple[TrainState, list[dict]]:
        if len(self.shards) == 1:
            return self._advance_one_worker(state, iterations)
        per_step = []
        for _ in range(iterations):
            # The parameters go to the object store once per iteration and every shard reads
            # them from there (an argument per call would serialize them once per worker); a
            # replaced worker's recomputation reads the same object.
            params = ray.put(state.params)
            results = self.pool.call([(w, "shard_step", (params, state.iteration, shard))
                                      for w, shard in enumerate(self.shards)])
            state = self.trainer.apply(state, results)
            per_step.append(_shard_metrics(results))
            if self.hooks.should_stop():
                raise JobCancelled()
        return state, per_step

    def _advance_one_worker(self, state: TrainState,
                            iterations: int) -> tuple[TrainState, list[dict]]:
        """The whole segment on the worker (no per-iteration round trip), with the next one
        queued behind it: the worker goes on from the state it ended at while the result
        travels back and the loop logs, evaluates or checkpoints. A queued segment is used
        only when the loop then asks for exactly it (from the very state object the previous
        segment returned, for as many iterations), else the segment is computed from the
        driver's state; the same arithmetic from the same state either way, so the same bits.
        A worker that died is replaced and the segment recomputed from the driver's state."""
        ahead, self.ahead = self.ahead, None
        if (ahead is not None and ahead.after is state and ahead.iterations == iterations
                and ahead.worker is self.pool.actors[0]):  # not replaced since it was queued
            following = self._queue_ahead(state.iteration + iterations)
            try:
                result = self.pool.wait(ahead.ref)
            except RayActorError as error:
                logger.warning("inner-loop worker died; recomputing its segment",
                               extra={"worker": 0, "error": str(error)[:200]})
                self.pool.restart(0)
            else:
                if following is not None:
                    self.ahead = _Ahead(result[0], *following)
                return result
        result = self.pool.call([(0, "run_segment", (state, iterations))])[0]
        following = self._queue_ahead(state.iteration + iterations)
        if following is not None:
            self.ahead = _Ahead(result[0], *following)
        return result

    def _queue_ahead(self, iteration: int) -> tuple[int, Any, Any] | None:
        """Queue on the worker the segment the loop asks for after one ending at ``iteration``
        (none after the last); returns its length, the reference to its result and the
        worker."""
        if iteration >= self.spec.iterations:
            return None
        length, worker = next_stop(iteration, self.spec) - iteration, self.pool.actors[0]
        return length, worker.run_ahead.remote(length), worker

    def evaluate(self, split: str) -> dict[str, float]:
        return self.pool.call([(0, "evaluate", (self.state.params, split))])[0]

    def close(self) -> None:
        self.pool.shutdown()


@dataclass(frozen=True)
class _Ahead:
    """A segment queued on the single worker: ``iterations`` from the state ``after``."""

    after: TrainState
    iterations: int
    ref: Any
    worker: Any


def _shard_metrics(results: list[ShardResult]) -> dict[str, float]:
    """Per-iteration metrics from the shards' per-task metrics, combined in worker order."""
    merged: dict[str, float] = {}
    names = results[0].metrics.keys()
    for name in names:
        values = torch.cat([r.metrics[name].reshape(-1).double() for r in results])
        merged[f"train/{name}"] = float(values.mean())
    return merged
