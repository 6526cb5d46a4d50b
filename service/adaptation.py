"""Server-side adaptation (``POST /v1/jobs/{id}/adapt``): bounds and shapes checked before
any work, the job's meta-initialization loaded from the artifact store once per artifact
version (small LRU), adapted with the job's recipe, predictions returned. The API route only maps HTTP to this."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from metaserve.service import artifacts, store
from metaserve.service.exceptions import (AdaptBusy, AdaptDiverged, AdaptInputTooLarge, AdaptTimedOut,
                                          InvalidAdaptInput, MetaInitNotReady)
from metaserve.service.jobs import Transaction
from metaserve.service.models import Artifact, Job, JobStatus, User
from metaserve.workers.spec import JobSpec
from metaserve.workers.storage import ArtifactStore, StorageError

CACHED_META_INITS = 4
META_INIT_FILES = ("meta_init.safetensors", "meta_init.json")


ADAPT_RETRY_AFTER_S = 2


class AdaptPool:
    """Adapt calls run here, not in the route threadpool that every other request's
    database work goes through: at most ``concurrency`` compute at once, ``queue`` more wait;
    one more is refused at once (:class:`AdaptBusy`, 503 + Retry-After). A caller waits at
    most ``timeout_s`` (:class:`AdaptTimedOut`, 504); a call still computing then keeps its
    slot until it ends (a thread cannot be stopped), so the bound on work always holds."""

    def __init__(self, *, concurrency: int, queue: int, timeout_s: float) -> None:
        self.concurrency, self.queue, self.timeout_s = concurrency, queue, timeout_s
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="metaserve-adapt")
        self._taken = 0
        self._lock = threading.Lock()

    def _release(self, _future: Future) -> None:
        with self._lock:
            self._taken -= 1

    @property
    def taken(self) -> int:
        return self._taken

    async def run(self, work: Callable[[], Any]) -> Any:
        with self._lock:
            if self._taken >= self.concurrency + self.queue:
                error = AdaptBusy(f"{self.concurrency} adaptations are running and "
                                  f"{self.queue} waiting; retry later")
                error.headers = {"Retry-After": str(ADAPT_RETRY_AFTER_S)}
                raise error
            self._taken += 1
        future = self._executor.submit(work)
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # a queued call never starts; a running one finishes unseen
            raise AdaptTimedOut(f"the adaptation did not finish within {self.timeout_s:g} s; "
                                "try fewer steps or smaller arrays") from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def count_values(array: Any, limit: int) -> int:
    """The numbers in a nested list, counting stops just above ``limit``."""
    count, stack = 0, [array]
    while stack and count <= limit:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        else:
            count += 1
    return count


def check_adapt_sizes(arrays: dict[str, Any], max_values: int) -> None:
    """413 naming the first array with more than ``max_values`` numbers (before any work)."""
    for field, array in arrays.items():
        if count_values(array, max_values) > max_values:
            raise AdaptInputTooLarge(f"{field} holds more than {max_values} numbers",
                                     **{field: f"at most {max_values} numbers"})


def adaptation_shapes(spec: dict[str, Any]) -> tuple[tuple[int, ...], int | None]:
    """``(input shape of one example, ways or None for regression)`` of a job's task family."""
    family = JobSpec.model_validate(spec).task_family
    if family.name in ("images", "glyphs"):
        channels = getattr(family, "channels", 1)
        return (channels, family.image_size, family.image_size), family.ways
    return (1,), None


def to_adapt_tensors(spec: dict[str, Any], support_x: Any, support_y: Any,
                     query_x: Any) -> tuple[Any, Any, Any]:
    """The arrays as tensors, shapes checked against the job's task family; 422 naming the
    field otherwise."""
    import torch

    input_shape, ways = adaptation_shapes(spec)

    def tensor(field: str, data: Any, dtype: torch.dtype) -> torch.Tensor:
        try:
            return torch.tensor(data, dtype=dtype)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise InvalidAdaptInput(f"{field}: not a rectangular array of numbers",
                                    **{field: "expected a rectangular array of numbers"}) from None

    def expect(field: str, value: torch.Tensor, shape: tuple[int, ...], text: str) -> None:
        if tuple(value.shape[1:]) != shape or value.dim() != len(shape) + 1:
            raise InvalidAdaptInput(f"{field}: shape {list(value.shape)}, expected {text}",
                                    **{field: f"shape {list(value.shape)}, expected {text}"})

    inputs_text = "[n, " + ", ".join(str(size) for size in input_shape) + "]"
    sx = tensor("support_x", support_x, torch.float32)
    qx = tensor("query_x", query_x, torch.float32)
    expect("support_x", sx, input_shape, inputs_text)
    expect("query_x", qx, input_shape, inputs_text.replace("[n", "[m"))
    if ways is None:
        sy = tensor("support_y", support_y, torch.float32)
        expect("support_y", sy, (1,), "[n, 1]")
    else:
        sy = tensor("support_y", support_y, torch.float64)
        expect("support_y", sy, (), "[n] class indices")
        if not bool(((sy >= 0) & (sy < ways) & (sy == sy.round())).all()):
            raise InvalidAdaptInput(f"support_y: class indices must be integers in [0, {ways})",
                                    support_y=f"class indices must be integers in [0, {ways})")
        sy = sy.long()
    if sx.shape[0] != sy.shape[0]:
        raise InvalidAdaptInput("support_y: one label per support input",
                                support_y=f"{sy.shape[0]} labels for {sx.shape[0]} inputs")
    if not (torch.isfinite(sx).all() and torch.isfinite(qx).all()
            and (ways is not None or torch.isfinite(sy).all())):
        raise InvalidAdaptInput("arrays must hold finite numbers", support_x="finite numbers only")
    return sx, sy, qx


def get_adaptable_job(*, session: Session, job_id: str,
                      owner: User) -> tuple[Job, dict[str, Artifact]]:
    """``owner``'s succeeded job with a registered meta-initialization, and its artifact
    records by name (409 otherwise; another user's job: JobNotFound)."""
    with Transaction(session):
        job = store.get_job(session=session, job_id=job_id, owner=owner)
        records = {a.name: a for a in store.list_artifacts(session=session, job_id=job_id)}
    if job.status != JobStatus.SUCCEEDED.value or not set(META_INIT_FILES) <= set(records):
        raise MetaInitNotReady(f"job {job_id} is {job.status}; only a succeeded job has a "
                               f"meta-initialization to adapt", job_id=job_id, status=job.status)
    return job, records


class MetaInitCache:
    """The last ``size`` loaded meta-initializations, least recently used evicted first; keyed
    by job and the safetensors file's sha256, so a replaced artifact is never served stale."""

    def __init__(self, size: int = CACHED_META_INITS) -> None:
        self.size = size
        self._models: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str, sha256: str, load: Callable[[], Any]) -> Any:
        """The cached model of ``(job_id, sha256)``, or ``load()``'s, then cached."""
        key = (job_id, sha256)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        model = load()  # outside the lock: downloading and loading may take a moment
        with self._lock:
            self._models[key] = model
            self._models.move_to_end(key)
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return model

    def __len__(self) -> int:
        return len(self._models)


def load_meta_init_from_store(store: ArtifactStore, job_id: str,
                               records: dict[str, Artifact]) -> Any:
    """The job's meta-initialization model, its two files downloaded from the store into a
    temporary directory (removed after loading) and checked against the sha256 the database
    recorded."""
    from metaserve.workers.engine.artifacts import load_meta_init

    with tempfile.TemporaryDirectory(prefix="metaserve-meta-init-") as scratch:
        for name in META_INIT_FILES:
            found = store.open(job_id, name)
            if found is None:
                raise artifacts.ArtifactNotFound("The meta-initialization files are missing.",
                                                 job_id=job_id)
            digest = hashlib.sha256()
            with open(Path(scratch) / name, "wb") as handle:
                for chunk in found[1]:
                    digest.update(chunk)
                    handle.write(chunk)
            if digest.hexdigest() != records[name].sha256:
                raise StorageError(f"artifact store {store.url}: {name} of job {job_id} does not "
                                   "match the sha256 recorded for it")
        model, _ = load_meta_init(Path(scratch))
    return model


def adapt_job(*, session: Session, job_id: str, owner: User, arrays: dict[str, Any],
              steps: int | None, max_values: int, store: ArtifactStore,
              cache: MetaInitCache) -> dict[str, Any]:
    """Adapt ``owner``'s succeeded job to ``arrays["support_x"/"support_y"]`` with its recipe
    (or ``steps`` inner steps) and predict ``arrays["query_x"]``."""
    import torch

    check_adapt_sizes(arrays, max_values)
    job, records = get_adaptable_job(session=session, job_id=job_id, owner=owner)
    support_x, support_y, query_x = to_adapt_tensors(job.spec, **arrays)
    try:
        model = cache.get(job_id, records["meta_init.safetensors"].sha256,
                          lambda: load_meta_init_from_store(store, job_id, records))
    except StorageError as error:
        raise artifacts.unavailable(error, job_id=job_id) from None
    steps = model.algorithm.inner_steps if steps is None else steps
    output = model.adapt(support_x, support_y, steps)(query_x).detach()
    if not bool(torch.isfinite(output).all()):
        raise AdaptDiverged(
            f"the adaptation diverged: non-finite predictions after {steps} inner steps "
            "(overflow); try fewer steps or inputs of a smaller scale",
            predictions=f"non-finite after {steps} inner steps (overflow)")
    labels = output.argmax(dim=-1).tolist() if model.algorithm.classification else None
    return {"predictions": output.tolist(), "labels": labels, "steps": steps,
            "algorithm": job.spec["algorithm"]["name"]}
