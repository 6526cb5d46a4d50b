"""The server's side of the artifact store (:mod:`metaserve.workers.object_store`): one store per
configuration, downloads of registered artifacts, and the cached availability check behind
``/readyz``.

Artifacts are only ever addressed by a job id (validated) and a name registered in the
database; the store refuses anything that is not a plain file name, so a client-supplied
string never reaches outside the job's prefix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from metaserve.service.exceptions import ArtifactNotFound, ArtifactStoreUnavailable
from metaserve.workers.object_store import (
    CHECKPOINT_DIRECTORY,
    JOB_ID_RE,
    MEDIA_TYPES,
    ArtifactFile,
    ArtifactStore,
    StorageConfig,
    StorageError,
    check_job_id,
    describe_file,
    open_store,
)

__all__ = ["CHECKPOINT_DIRECTORY", "JOB_ID_RE", "MEDIA_TYPES", "ArtifactFile", "ArtifactNotFound",
           "ArtifactStore", "ArtifactStoreUnavailable", "StorageError", "StoreHealth", "describe", "get_store", "job_dir",
           "open_artifact", "unavailable"]

logger = logging.getLogger(__name__)

STORE_CHECK_CACHE_S = 5.0  # /readyz asks the store at most this often


def unavailable(error: StorageError, **details: str) -> ArtifactStoreUnavailable:
    """The client's error for a store failure; the store's own line (which names the bucket
    and endpoint) goes to the log, not to the client."""
    logger.error("artifact store failed: %s", error,
                 extra={f"artifact_{key}" if key == "name" else key: value
                        for key, value in details.items()})
    return ArtifactStoreUnavailable(**details)


@lru_cache(maxsize=8)
def get_store(config: StorageConfig) -> ArtifactStore:
    """The store for ``config``, made once per process (an S3 client keeps its connections)."""
    return open_store(config)


def describe(path: Path) -> ArtifactFile:
    """Size, sha256 and media type of one local artifact file."""
    return describe_file(Path(path))


def job_dir(root: Path | str, job_id: str) -> Path:
    """The directory of ``job_id``'s artifacts under a local artifact root."""
    if str(root).startswith("s3://"):
        raise ValueError(f"{root} is not a local directory")
    return Path(root).resolve() / check_job_id(job_id)


def open_artifact(store: ArtifactStore, job_id: str, name: str) -> tuple[int, Iterator[bytes]]:
    """Size and chunks of the registered artifact ``name``; 404 when its object is missing,
    503 when the store fails."""
    try:
        found = store.open(job_id, name)
    except ValueError:  # a name no store holds (a bad record): nothing to serve
        found = None
    except StorageError as error:
        raise unavailable(error, job_id=job_id, name=name) from None
    if found is None:
        raise ArtifactNotFound("Artifact file is missing.", job_id=job_id, name=name)
    return found


class StoreHealth:
    """The store's availability check, remembered for ``ttl_s`` seconds so that a readiness
    probe stays cheap; ``error()`` is None when the store answered."""

    def __init__(self, store: ArtifactStore, ttl_s: float = STORE_CHECK_CACHE_S):
        self.store, self.ttl_s = store, ttl_s
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._error: str | None = None

    def error(self) -> str | None:
        with self._lock:  # one check at a time; concurrent probes reuse its answer
            now = time.monotonic()
            if self._checked_at is None or now - self._checked_at >= self.ttl_s:
                try:
                    self.store.check()
                    self._error = None
                except StorageError as failure:
                    self._error = str(failure)
                self._checked_at = time.monotonic()
            return self._error
