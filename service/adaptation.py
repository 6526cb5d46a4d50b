"""Server-side adaptation (``POST /v1/jobs/{id}/adapt``) in two halves: the API process checks
the bounds and looks the job up (:func:`prepare_adaptation`, no torch), then an adapt process
(:mod:`metaserve.service.adapt_pool`) checks the shapes, loads the job's meta-initialization
from the artifact store once per artifact version (small LRU) and adapts it with the job's
recipe (:func:`compute_adaptation`). The API route only maps HTTP to this."""

from __future__ import annotations

import hashlib
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from metaserve.service import artifacts, job_store
from metaserve.service.exceptions import (AdaptDiverged, AdaptInputTooLarge, ArtifactNotFound,
                                          InvalidAdaptInput, MetaInitNotReady, NotAdaptable)
from metaserve.service.orm import Artifact, Job, JobStatus, User
from metaserve.workers.spec import IMAGE_FAMILIES, PLUGINS, JobSpec
from metaserve.workers.object_store import ArtifactStore, StorageConfig, StorageError

CACHED_META_INITS = 4
META_INIT_FILES = ("meta_init.safetensors", "meta_init.json")


def count_values(array: Any, limit: int) -> int:
    """The values in a nested list (or a tabular job's named columns or row objects),
    counting stops just above ``limit``."""
    count, stack = 0, [array]
    while stack and count <= limit:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
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
    if family.name in IMAGE_FAMILIES:
        channels = getattr(family, "channels", 1)
        return (channels, family.image_size, family.image_size), family.ways
    if family.name in PLUGINS.task_families:  # a plugin's family states its input shape
        return tuple(family.input_shape), None
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
    records by name (409 otherwise, and for a meta-RL job whatever its status, saying what to
    use instead; another user's job: JobNotFound)."""
    with session.begin():
        job = job_store.get_job(session=session, job_id=job_id, owner=owner)
        records = {a.name: a for a in job_store.list_artifacts(session=session, job_id=job_id)}
    if job_store.job_spec(job).is_rl:  # its artifact is a meta_policy
        algorithm, family = job.spec["algorithm"]["name"], job.spec["task_family"]["name"]
        raise NotAdaptable(
            f"job {job_id} is a meta-RL job ({algorithm} on {family}): its artifact is a "
            "meta-policy, which adapts by acting in a task, not on support arrays. Use the "
            f"Python SDK: policy = Client().load_meta_policy({job_id!r}), then "
            "policy.adapt(task).act(observation); offline, load_meta_policy(DIR) on what "
            f"`metaserve fetch {job_id} -o DIR` downloaded",
            job_id=job_id, artifact_kind="meta_policy", use="Client.load_meta_policy")
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


def load_meta_init_from_store(store: ArtifactStore, job_id: str, sha256: dict[str, str]) -> Any:
    """The job's meta-initialization model, its two files downloaded from the store into a
    temporary directory (removed after loading) and checked against the sha256 the database
    recorded."""
    from metaserve.workers.engine.final_artifact import load_meta_init

    with tempfile.TemporaryDirectory(prefix="metaserve-meta-init-") as scratch:
        for name in META_INIT_FILES:
            found = store.open(job_id, name)
            if found is None:
                raise ArtifactNotFound("The meta-initialization files are missing.",
                                       job_id=job_id)
            digest = hashlib.sha256()
            with open(Path(scratch) / name, "wb") as handle:
                for chunk in found[1]:
                    digest.update(chunk)
                    handle.write(chunk)
            if digest.hexdigest() != sha256[name]:
                raise StorageError(f"artifact store {store.url}: {name} of job {job_id} does not "
                                   "match the sha256 recorded for it")
        model, _ = load_meta_init(Path(scratch))
    return model


@dataclass(frozen=True)
class AdaptWork:
    """One adaptation as plain data, sent to an adapt process: the job's spec and the sha256
    the database recorded for each meta-initialization file, the request's arrays and steps,
    and where the artifacts are."""

    job_id: str
    spec: dict[str, Any]
    sha256: dict[str, str]
    arrays: dict[str, Any]
    steps: int | None
    storage: StorageConfig


def prepare_adaptation(*, session: Session, job_id: str, owner: User, arrays: dict[str, Any],
                       steps: int | None, max_values: int, storage: StorageConfig) -> AdaptWork:
    """The API process's half: sizes (413 naming the array) and ``owner``'s succeeded job with
    its meta-initialization (404 / 409), before any work is handed on."""
    check_adapt_sizes(arrays, max_values)
    job, records = get_adaptable_job(session=session, job_id=job_id, owner=owner)
    return AdaptWork(job_id=job_id, spec=dict(job.spec),
                     sha256={name: records[name].sha256 for name in META_INIT_FILES},
                     arrays=arrays, steps=steps, storage=storage)


def compute_adaptation(work: AdaptWork, cache: MetaInitCache) -> dict[str, Any]:
    """The adapt process's half: shapes checked against the job's task family (422 naming the
    field), the meta-initialization from ``cache`` or the store, adapted to the support set
    with the job's recipe (or ``work.steps`` inner steps), the query inputs predicted."""
    import torch

    tabular = work.spec["task_family"]["name"] == "tabular"
    if not tabular:
        if "support" in work.arrays:
            raise InvalidAdaptInput(
                "support: named rows (support, query) are for tabular jobs; this job takes "
                "arrays support_x, support_y, query_x",
                support="named rows are for tabular jobs: give support_x, support_y, query_x")
        support_x, support_y, query_x = to_adapt_tensors(work.spec, **work.arrays)
    try:
        model = cache.get(work.job_id, work.sha256["meta_init.safetensors"],
                          lambda: load_meta_init_from_store(artifacts.get_store(work.storage),
                                                            work.job_id, work.sha256))
    except StorageError as error:
        raise artifacts.unavailable(error, job_id=work.job_id) from None
    steps = model.algorithm.inner_steps if work.steps is None else work.steps
    if tabular:
        return adapt_table_rows(work, model, steps)
    output = model.adapt(support_x, support_y, steps)(query_x).detach()
    if not bool(torch.isfinite(output).all()):
        raise AdaptDiverged(
            f"the adaptation diverged: non-finite predictions after {steps} inner steps "
            "(overflow); try fewer steps or inputs of a smaller scale",
            predictions=f"non-finite after {steps} inner steps (overflow)")
    labels = output.argmax(dim=-1).tolist() if model.algorithm.classification else None
    return {"predictions": output.tolist(), "labels": labels, "steps": steps,
            "algorithm": work.spec["algorithm"]["name"]}


def adapt_table_rows(work: AdaptWork, model: Any, steps: int) -> dict[str, Any]:
    """A tabular job's served task: the raw rows checked against and scaled with the recipe its
    artifact records (422 naming the column), predictions in the target's units
    (:meth:`~metaserve.workers.engine.final_artifact.MetaInitModel.adapt_rows`)."""
    import numpy as np

    from metaserve.workers.exceptions import RowsInvalid

    try:
        result = model.adapt_rows(**work.arrays, steps=steps)
    except RowsInvalid as error:
        raise InvalidAdaptInput(str(error), **{error.field: error.message}) from None
    if not bool(np.isfinite(np.asarray(result["predictions"], dtype=np.float64)).all()):
        raise AdaptDiverged(
            f"the adaptation diverged: non-finite predictions after {steps} inner steps "
            "(overflow); try fewer steps",
            predictions=f"non-finite after {steps} inner steps (overflow)")
    return {**result, "steps": steps, "algorithm": work.spec["algorithm"]["name"]}
