"""The artifact store: job artifacts and checkpoints on a local directory or on S3.

One client for every host: the server serves downloads and loads meta-initializations from
it, dispatchers and Ray workers publish checkpoints and artifacts to it and resume from it.
It takes plain data (:class:`StorageConfig`, picklable, so it travels to Ray actors) and
imports nothing from ``metaserve.service`` or ``metaserve.api``.

Layout under the root (a directory, or ``s3://bucket/prefix``), the same for both backends::

    <job_id>/checkpoint/manifest.json                 the job's manifest: which attempt wrote it,
                                                      its checkpoint set and its artifacts
    <job_id>/attempt-<n>/<version>/checkpoint.safetensors   what attempt n published, one
    <job_id>/attempt-<n>/<version>/meta_init.json           version per publication
    <dataset_id>/<name>                               write-once data of no attempt (datasets)

Fencing: a job's attempt (1, 2, ...) publishes under its own prefix, then makes its files
current with one *conditional* write of the manifest (``If-None-Match: *`` / ``If-Match:
<etag>`` on S3; compare-and-replace under ``flock`` locally). It reads the manifest first and
again whenever the conditional write finds it changed: when a newer attempt wrote it, the
publication is refused (:class:`AttemptFenced`) and its uploads removed. So two attempts
writing at once leave the newest attempt's manifest, which names only objects that exist: a
writer only removes what the manifest it just made current does not name, of older attempts
(or older versions of its own), never a newer attempt's. Readers (resume, downloads) go
through the manifest, so they see the newest attempt's complete set, never a mix; a reader
racing a publication re-reads it. A crash before the manifest write leaves the previous set
current (and orphans that the next publication removes). A checkpoint set from before
attempt prefixes (format 1, ``<job_id>/checkpoint/<version>/``; or, locally, files in
``<job_id>/checkpoint/`` without a manifest) is read as attempt 0.

Keys are only ever built from a validated job id (``^[0-9A-Za-z_-]{1,64}$``), a plain file
name, and a version this module made; nothing a client sends can leave a job's prefix.

The S3 client is obstore (measured against boto3 and s3fs: docs/notes/object-storage-client.md).

Modules: :mod:`~metaserve.workers.object_store.base` (the layout, keys, manifests and the
publication logic both backends share), :mod:`~metaserve.workers.object_store.local` and
:mod:`~metaserve.workers.object_store.s3` (the backends); :func:`open_store` picks one.
"""

from __future__ import annotations

from metaserve.workers.object_store.base import (CHECKPOINT_DIRECTORY, JOB_ID_RE, MANIFEST_NAME, MEDIA_TYPES,
                                                 ArtifactFile, ArtifactStore, AttemptFenced, StorageConfig, StorageError,
                                                 check_job_id, check_name, describe_file, media_type,
                                                 parse_s3_url)
from metaserve.workers.object_store.local import LocalStore
from metaserve.workers.object_store.s3 import S3Store


def open_store(config: StorageConfig) -> ArtifactStore:
    """The backend for ``config.root``: :class:`S3Store` for ``s3://``, else :class:`LocalStore`."""
    if config.is_s3:
        return S3Store(config)
    if "://" in config.root:
        raise ValueError(f"{config.root!r}: an artifact root is a directory or an s3://bucket/prefix URL")
    return LocalStore(config)


__all__ = ["CHECKPOINT_DIRECTORY", "JOB_ID_RE", "MANIFEST_NAME", "MEDIA_TYPES", "ArtifactFile",
           "ArtifactStore", "AttemptFenced", "LocalStore", "S3Store", "StorageConfig", "StorageError", "check_job_id",
           "check_name", "describe_file", "media_type", "open_store", "parse_s3_url"]
