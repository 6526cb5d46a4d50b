"""The artifact store: one directory per job under ``ARTIFACT_ROOT``.

Files are only ever addressed by a job id (validated) and a name registered in the
database; a client-supplied path never reaches the filesystem.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

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
