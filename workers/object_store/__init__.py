"""The artifact store: job artifacts and checkpoints on a local directory or on S3.

One client for every host: the server serves downloads and loads meta-initializations from
it, dispatchers and Ray workers publish checkpoints and artifacts to it and resume from it.
It takes plain data (:class:`StorageConfig`, picklable, so it travels to Ray actors) and
imports nothing from ``metaserve.service`` or ``metaserve.api``.

Layout under the root (a directory, or ``s3://bucket/prefix``), the same for both backends::

    <job_id>/meta_init.safetensors                    one object per artifact, written atomically
    <job_id>/meta_init.json
    <job_id>/checkpoint/manifest.json                 names the current checkpoint set
    <job_id>/checkpoint/<version>/checkpoint.safetensors
    <job_id>/checkpoint/<version>/checkpoint.json

A checkpoint set is published as a whole: its files go under a new version, then the manifest
is replaced (one atomic write: ``os.replace`` locally, a single PUT on S3), then the previous
versions are removed. A reader goes through the manifest, so it sees the previous complete
set or the new one, never a mix; a crash before the manifest write leaves the previous set
current (and an orphaned version that the next publication removes).

Keys are only ever built from a validated job id (``^[0-9A-Za-z_-]{1,64}$``), a plain file
name, and a version this module made; nothing a client sends can leave a job's prefix.

The S3 client is obstore (measured against boto3 and s3fs: docs/notes/object-storage-client.md).

Modules: :mod:`~metaserve.workers.object_store.base` (the layout, keys, manifests and the
publication logic both backends share), :mod:`~metaserve.workers.object_store.local` and
:mod:`~metaserve.workers.object_store.s3` (the backends); :func:`open_store` picks one.
"""

from __future__ import annotations

from metaserve.workers.object_store.base import (CHECKPOINT_DIRECTORY, JOB_ID_RE, MANIFEST_NAME, MEDIA_TYPES,
                                                 ArtifactFile, ArtifactStore, StorageConfig, StorageError,
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
           "ArtifactStore", "LocalStore", "S3Store", "StorageConfig", "StorageError", "check_job_id",
           "check_name", "describe_file", "media_type", "open_store", "parse_s3_url"]
