"""The artifact store's layout and its one publication/reading logic, whatever the backend:
keys, names and checkpoint manifests (see :mod:`metaserve.workers.object_store`). A backend
(:mod:`~metaserve.workers.object_store.local`, :mod:`~metaserve.workers.object_store.s3`)
supplies six primitives: put a file or bytes, get bytes, stream, list, delete keys."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaserve.workers.exceptions import StorageError  # noqa: F401 - raised here, imported from here

logger = logging.getLogger(__name__)

CHECKPOINT_DIRECTORY = "checkpoint"  # = workers.engine.loop.CHECKPOINT_DIRECTORY
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
CHUNK_BYTES = 1 << 20
PART_BYTES = 8 << 20  # multipart part size of S3 uploads (measured: faster than the 5 MiB default)
CHECK_TIMEOUT_S = 3.0  # one availability check: connect + answer
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 300.0  # a whole transfer (a large safetensors file) on a slow link
TRANSFER_RETRIES = 3
RETRY_TIMEOUT_S = 30.0
FETCH_ATTEMPTS = 3  # a reader racing a publication re-reads the manifest this often

JOB_ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
NAME_RE = re.compile(r"^[0-9A-Za-z_][0-9A-Za-z._-]{0,254}$")
VERSION_RE = re.compile(r"^[0-9]{20}-[0-9a-f]{8}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
PREFIX_PART_RE = re.compile(r"^[0-9A-Za-z._-]+$")

MEDIA_TYPES = {
    ".safetensors": "application/octet-stream",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
}


@dataclass(frozen=True)
class StorageConfig:
    """Where artifacts live; plain picklable data that travels to Ray actors."""

    root: str  # "/some/dir", "./rel/dir" or "s3://bucket/prefix"
    endpoint_url: str = ""  # S3 endpoint, e.g. http://artifacts:9000 ("" = AWS default)
    access_key_id: str = ""  # "" = the environment's / instance's AWS credentials
    secret_access_key: str = field(default="", repr=False)
    region: str = "us-east-1"

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")


@dataclass(frozen=True)
class ArtifactFile:
    name: str
    size: int
    sha256: str
    media_type: str


def media_type(name: str) -> str:
    return MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream")


def describe_file(path: Path) -> ArtifactFile:
    """Size, sha256 and media type of one local file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return ArtifactFile(name=path.name, size=size, sha256=digest.hexdigest(),
                        media_type=media_type(path.name))


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id


def check_name(name: str) -> str:
    """``name`` if it is a plain file name (no separator, not ``..``, not hidden), else ValueError."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name == CHECKPOINT_DIRECTORY:
        raise ValueError(f"not an artifact file name: {name!r}")
    return name


def parse_s3_url(root: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/prefix``; ValueError naming what is wrong."""
    if not root.startswith("s3://"):
        raise ValueError(f"{root!r} is not an s3:// URL")
    bucket, _, prefix = root[len("s3://"):].partition("/")
    if not BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(f"{root!r}: {bucket!r} is not a valid S3 bucket name "
                         "(3-63 characters: lowercase letters, digits, '.', '-')")
    parts = [part for part in prefix.split("/") if part]
    for part in parts:
        if part in (".", "..") or not PREFIX_PART_RE.match(part):
            raise ValueError(f"{root!r}: prefix part {part!r} is not allowed "
                             "(letters, digits, '.', '_', '-')")
    return bucket, "/".join(parts)


def version_of(key_parts: list[str]) -> str | None:
    return key_parts[2] if len(key_parts) == 4 and VERSION_RE.match(key_parts[2]) else None


class _Sha256Reader:
    """Checks a download against the sha256 its manifest recorded."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.size += len(chunk)


class ArtifactStore:
    """What both backends do; subclasses provide the object primitives (``_put_file``,
    ``_put_bytes``, ``_get_bytes``, ``_stream``, ``_list``, ``_delete_keys``) and ``check``."""

    url: str
    location: str
    """The root as a person finds it: a directory, or ``s3://bucket/prefix``."""

    # -- the interface ---------------------------------------------------------------------

    def checkpoint_location(self, job_id: str) -> str:
        """Where the job's checkpoint lives, for messages."""
        return f"{self.location}/{check_job_id(job_id)}/{CHECKPOINT_DIRECTORY}"

    def check(self) -> None:
        """One cheap round trip to the store; StorageError when it cannot be used."""
        raise NotImplementedError

    def put(self, job_id: str, paths: list[Path]) -> list[ArtifactFile]:
        """Publish files written locally. Files in a directory named ``checkpoint`` form one
        checkpoint set, published atomically as a set; every other file is published
        atomically at ``<job_id>/<name>``. Returns the description of each file, in order."""
        check_job_id(job_id)
        paths = [Path(path) for path in paths]
        for path in paths:
            check_name(path.name)
        described = {path: describe_file(path) for path in paths}
        checkpoint = [path for path in paths if path.parent.name == CHECKPOINT_DIRECTORY]
        if len({path.name for path in checkpoint}) != len(checkpoint):
            raise ValueError(f"a checkpoint set holds each name once: {[str(p) for p in checkpoint]}")
        for path in paths:
            if path not in checkpoint:
                self._call(self._put_file, self._key(job_id, path.name), path)
        if checkpoint:
            self._publish_checkpoint(job_id, [(path, described[path]) for path in checkpoint])
        return [described[path] for path in paths]

    def fetch_checkpoint(self, job_id: str, directory: Path) -> bool:
        """Write the last complete checkpoint set into ``directory`` (sha256 verified);
        False when the job has none."""
        check_job_id(job_id)
        directory = Path(directory)
        for _ in range(FETCH_ATTEMPTS):
            manifest = self._read_manifest(job_id)
            if manifest is None:
                return self._fetch_unversioned_checkpoint(job_id, directory)
            version, files = manifest
            directory.mkdir(parents=True, exist_ok=True)
            written: list[tuple[Path, Path]] = []
            try:
                for entry in files:
                    temporary = directory / f".{entry.name}.{secrets.token_hex(4)}.tmp"
                    if not self._download_verified(job_id, version, entry, temporary):
                        break  # the set was replaced while we read it: read the manifest again
                    written.append((temporary, directory / entry.name))
                else:
                    for temporary, final in written:
                        os.replace(temporary, final)
                    written = []
                    return True
            finally:
                for temporary, _ in written:
                    temporary.unlink(missing_ok=True)
        raise self._error(f"checkpoint of job {job_id}: its objects keep disappearing "
                          "while being read (another writer?)")

    def open(self, job_id: str, name: str) -> tuple[int, Iterator[bytes]] | None:
        """Size and chunks of the artifact ``name`` of ``job_id`` (a checkpoint file resolves
        through the manifest), or None when it is missing."""
        check_job_id(job_id)
        check_name(name)
        found = self._call(self._stream, self._key(job_id, name))
        if found is not None:
            return found
        for _ in range(FETCH_ATTEMPTS):
            manifest = self._read_manifest(job_id)
            if manifest is None:
                return self._open_unversioned_checkpoint(job_id, name)
            version, files = manifest
            if name not in {entry.name for entry in files}:
                return None
            found = self._call(self._stream, self._checkpoint_key(job_id, version, name))
            if found is not None:
                return found
        return None

    def delete(self, job_id: str) -> None:
        """Remove every object of ``job_id``."""
        check_job_id(job_id)
        keys = self._call(self._list, job_id + "/")
        if keys:
            self._call(self._delete_keys, keys)

    # -- checkpoint sets -------------------------------------------------------------------

    def _publish_checkpoint(self, job_id: str, files: list[tuple[Path, ArtifactFile]]) -> None:
        try:
            previous = self._read_manifest(job_id)
        except StorageError:  # an unreadable manifest is about to be replaced
            previous = None
        version = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        for path, described in files:
            self._call(self._put_file, self._checkpoint_key(job_id, version, described.name), path)
        document = {"format": MANIFEST_FORMAT, "version": version,
                    "files": [{"name": d.name, "size": d.size, "sha256": d.sha256,
                               "media_type": d.media_type} for _, d in files]}
        self._call(self._put_bytes, self._manifest_key(job_id),
                   json.dumps(document, indent=2, sort_keys=True).encode())
        # The previous set and older versions (orphans of interrupted publications) go; a
        # newer version than ours is left alone: only a concurrent writer can have made it.
        try:
            stale = []
            for key in self._list(f"{job_id}/{CHECKPOINT_DIRECTORY}/"):
                old = version_of(key.split("/"))
                if old is not None and old != version and (
                        old < version or (previous is not None and old == previous[0])):
                    stale.append(key)
            if stale:
                self._delete_keys(stale)
        except Exception:  # noqa: BLE001 - the new set is published; leftovers go next time
            logger.warning("removing old checkpoint objects failed", exc_info=True,
                           extra={"job_id": job_id, "store": self.url})

    def _read_manifest(self, job_id: str) -> tuple[str, list[ArtifactFile]] | None:
        data = self._call(self._get_bytes, self._manifest_key(job_id))
        if data is None:
            return None
        try:
            document = json.loads(data)
            version = document["version"]
            if document.get("format") != MANIFEST_FORMAT or not VERSION_RE.match(version):
                raise ValueError(f"unknown format or version {version!r}")
            files = [ArtifactFile(name=check_name(entry["name"]), size=int(entry["size"]),
                                  sha256=str(entry["sha256"]), media_type=str(entry["media_type"]))
                     for entry in document["files"]]
        except (ValueError, KeyError, TypeError) as error:
            raise self._error(f"checkpoint manifest of job {job_id} is invalid ({error})") from None
        return version, files

    def _download_verified(self, job_id: str, version: str, entry: ArtifactFile,
                           target: Path) -> bool:
        found = self._call(self._stream, self._checkpoint_key(job_id, version, entry.name))
        if found is None:
            return False
        _, chunks = found
        digest = _Sha256Reader()
        with private_file(target) as handle:
            for chunk in self._iterate(chunks):
                digest.update(chunk)
                handle.write(chunk)
        if digest.digest.hexdigest() != entry.sha256 or digest.size != entry.size:
            target.unlink(missing_ok=True)
            raise self._error(f"checkpoint file {entry.name} of job {job_id} does not match its "
                              f"manifest (sha256 {digest.digest.hexdigest()[:12]}…, expected "
                              f"{entry.sha256[:12]}…): refusing it")
        return True

    def _fetch_unversioned_checkpoint(self, job_id: str, directory: Path) -> bool:
        """A checkpoint written before manifests existed (local only); none elsewhere."""
        return False

    def _open_unversioned_checkpoint(self, job_id: str, name: str) -> tuple[int, Iterator[bytes]] | None:
        return None

    # -- keys, errors ----------------------------------------------------------------------

    @staticmethod
    def _key(job_id: str, name: str) -> str:
        return f"{check_job_id(job_id)}/{check_name(name)}"

    @staticmethod
    def _manifest_key(job_id: str) -> str:
        return f"{check_job_id(job_id)}/{CHECKPOINT_DIRECTORY}/{MANIFEST_NAME}"

    @staticmethod
    def _checkpoint_key(job_id: str, version: str, name: str) -> str:
        if not VERSION_RE.match(version):
            raise ValueError(f"not a checkpoint version: {version!r}")
        return f"{check_job_id(job_id)}/{CHECKPOINT_DIRECTORY}/{version}/{check_name(name)}"

    def _error(self, cause: str) -> StorageError:
        return StorageError(f"artifact store {self.url}: {cause}")

    def _call(self, function, *args: Any) -> Any:  # noqa: ANN001
        """``function(*args)`` with a backend failure turned into one StorageError line."""
        try:
            return function(*args)
        except StorageError:
            raise
        except Exception as error:  # noqa: BLE001 - the backend's own failures
            raise self._error(self._describe(error)) from error

    def _iterate(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from chunks
        except StorageError:
            raise
        except Exception as error:  # noqa: BLE001
            raise self._error(self._describe(error)) from error

    def _describe(self, error: BaseException) -> str:
        return first_line(f"{type(error).__name__}: {error}")

    # -- primitives ------------------------------------------------------------------------

    def _put_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def _put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def _get_bytes(self, key: str) -> bytes | None:
        raise NotImplementedError

    def _stream(self, key: str) -> tuple[int, Iterator[bytes]] | None:
        raise NotImplementedError

    def _list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def _delete_keys(self, keys: list[str]) -> None:
        raise NotImplementedError


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else text.strip())[:500]


@contextlib.contextmanager
def private_file(path: Path) -> Iterator[Any]:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
