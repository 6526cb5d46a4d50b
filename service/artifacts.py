"""The artifact store: one directory per job under ``ARTIFACT_ROOT``.

Files are only ever addressed by a job id (validated) and a name registered in the
database; a client-supplied path never reaches the filesystem.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from metaserve.service.exceptions import MetaserveError

CHECKPOINT_DIRECTORY = "checkpoint"  # = workers.engine.trainer.CHECKPOINT_DIRECTORY
JOB_ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
CHUNK_BYTES = 1 << 20

MEDIA_TYPES = {
    ".safetensors": "application/octet-stream",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
}


@dataclass(frozen=True)
class ArtifactFile:
    name: str
    size: int
    sha256: str
    media_type: str


def job_dir(root: Path | str, job_id: str) -> Path:
    """The directory holding ``job_id``'s checkpoints and artifacts."""
    if not JOB_ID_RE.match(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return Path(root).resolve() / job_id


def describe(path: Path) -> ArtifactFile:
    """Size, sha256 and media type of one artifact file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return ArtifactFile(
        name=path.name,
        size=path.stat().st_size,
        sha256=digest.hexdigest(),
        media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
    )


class ArtifactNotFound(MetaserveError):
    """Artifact not found."""

    status_code = 404
    code = "not_found"


def locate(root: Path | str, job_id: str, name: str) -> Path | None:
    """The file of the artifact ``name`` of ``job_id``, or None when it is missing.

    ``name`` must be a name the database registered for the job (the caller looks it up
    first). The path is never built from ``name``: the job's directory and its
    ``checkpoint/`` directory are listed and the regular file (not a link) whose entry
    equals ``name`` is returned, so no string can reach outside them.
    """
    directory = job_dir(root, job_id)
    for candidate_dir in (directory, directory / CHECKPOINT_DIRECTORY):
        try:
            entries = list(candidate_dir.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.name == name and entry.is_file() and not entry.is_symlink():
                return entry
    return None
