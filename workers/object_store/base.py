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

from metaserve.workers.exceptions import AttemptFenced, StorageError  # noqa: F401 - raised here, imported from here

logger = logging.getLogger(__name__)

CHECKPOINT_DIRECTORY = "checkpoint"  # = workers.engine.loop.CHECKPOINT_DIRECTORY
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2  # 1: a checkpoint set only, objects under <job>/checkpoint/<version>/ (still read)
ATTEMPT_PREFIX = "attempt-"
MAX_ATTEMPT = 999_999_999
PUBLISH_TRIES = 20  # conditional manifest writes before a publication gives up
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
ATTEMPT_RE = re.compile(r"^attempt-([1-9][0-9]{0,8})$")
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
    if (not isinstance(name, str) or not NAME_RE.match(name) or name == CHECKPOINT_DIRECTORY
            or ATTEMPT_RE.match(name)):
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


def object_place(key_parts: list[str]) -> tuple[int, str] | None:
    """``(attempt, version)`` of an object a manifest can name (``<job>/attempt-<n>/<version>/<name>``,
    or ``<job>/checkpoint/<version>/<name>``: attempt 0), else None."""
    version = version_of(key_parts)
    if version is None:
        return None
    if key_parts[1] == CHECKPOINT_DIRECTORY:
        return 0, version
    match = ATTEMPT_RE.match(key_parts[1])
    return (int(match.group(1)), version) if match else None


@dataclass(frozen=True)
class Entry:
    """A file a manifest names: its description and where it lives (attempt, version)."""

    file: ArtifactFile
    attempt: int
    version: str

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def size(self) -> int:
        return self.file.size

    @property
    def sha256(self) -> str:
        return self.file.sha256

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256,
                "media_type": self.file.media_type, "attempt": self.attempt, "version": self.version}

    @staticmethod
    def from_json(entry: dict[str, Any], attempt: int, version: str) -> "Entry":
        attempt, version = int(entry.get("attempt", attempt)), str(entry.get("version", version))
        if not VERSION_RE.match(version) or not 0 <= attempt <= MAX_ATTEMPT:
            raise ValueError(f"bad place of {entry.get('name')!r}: attempt {attempt}, version {version!r}")
        return Entry(ArtifactFile(name=check_name(entry["name"]), size=int(entry["size"]),
                                  sha256=str(entry["sha256"]), media_type=str(entry["media_type"])),
                     attempt, version)


@dataclass(frozen=True)
class Manifest:
    """A job's manifest: the attempt that wrote it, the current checkpoint set (None: none
    yet) and the current artifacts. Format 1 (before attempt prefixes) named a checkpoint
    set only; it reads as attempt 0."""

    format: int
    attempt: int
    version: str
    checkpoint: list[Entry] | None
    artifacts: list[Entry]

    def find(self, name: str) -> Entry | None:
        for entry in (*(self.checkpoint or []), *self.artifacts):
            if entry.name == name:
                return entry
        return None

    def entries(self) -> list[Entry]:
        return [*(self.checkpoint or []), *self.artifacts]

    def encode(self) -> bytes:
        document = {"format": MANIFEST_FORMAT, "attempt": self.attempt, "version": self.version,
                    "checkpoint": None if self.checkpoint is None else [e.to_json() for e in self.checkpoint],
                    "artifacts": [entry.to_json() for entry in self.artifacts]}
        return json.dumps(document, indent=2, sort_keys=True).encode()

    @staticmethod
    def decode(data: bytes) -> "Manifest":
        document = json.loads(data)
        version = document["version"]
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise ValueError(f"unknown version {version!r}")
        if document.get("format") == 1:
            return Manifest(1, 0, version, [Entry.from_json(e, 0, version) for e in document["files"]], [])
        if document.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown format {document.get('format')!r}")
        attempt = int(document["attempt"])
        checkpoint = document["checkpoint"]
        return Manifest(MANIFEST_FORMAT, attempt, version,
                        None if checkpoint is None else [Entry.from_json(e, attempt, version) for e in checkpoint],
                        [Entry.from_json(e, attempt, version) for e in document["artifacts"]])


def _next_manifest(current: Manifest | None, attempt: int, version: str,
                   checkpoint: list[ArtifactFile], artifacts: list[ArtifactFile]) -> Manifest:
    """The manifest after ``attempt`` published ``checkpoint`` (a new set, or none: the
    current set stays, whichever attempt wrote it, since this one resumed from it) and
    ``artifacts`` (added to its own attempt's; an older attempt's artifacts are dropped)."""
    if checkpoint:
        checkpoint_entries: list[Entry] | None = [Entry(d, attempt, version) for d in checkpoint]
    else:
        checkpoint_entries = current.checkpoint if current is not None else None
    named = {e.name: e for e in current.artifacts} if current is not None and current.attempt == attempt else {}
    named.update({d.name: Entry(d, attempt, version) for d in artifacts})
    return Manifest(MANIFEST_FORMAT, attempt, version, checkpoint_entries,
                    [named[name] for name in sorted(named)])


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

    def put(self, job_id: str, paths: list[Path], *, attempt: int | None = None) -> list[ArtifactFile]:
        """Publish files written locally; returns the description of each file, in order.

        A job's attempt passes ``attempt`` (its number, 1, 2, ...): its files go under
        ``<job_id>/attempt-<n>/<version>/`` and become current through one conditional write
        of the job's manifest (see the module docstring): files in a directory named
        ``checkpoint`` replace the checkpoint set, every other file the artifact of its name.
        A stale attempt (the manifest names a newer one) is refused with
        :class:`AttemptFenced` and its uploads are removed.

        Without ``attempt`` (write-once data of no job attempt: an uploaded dataset), each
        file is written atomically at ``<job_id>/<name>``; a checkpoint set needs an attempt."""
        check_job_id(job_id)
        paths = [Path(path) for path in paths]
        for path in paths:
            check_name(path.name)
        checkpoint = [path for path in paths if path.parent.name == CHECKPOINT_DIRECTORY]
        if len({path.name for path in checkpoint}) != len(checkpoint):
            raise ValueError(f"a checkpoint set holds each name once: {[str(p) for p in checkpoint]}")
        if attempt is None and checkpoint:
            raise ValueError("a checkpoint set is published by a job's attempt: pass attempt=")
        if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int)
                                    or not 1 <= attempt <= MAX_ATTEMPT):
            raise ValueError(f"not an attempt number: {attempt!r}")
        described = {path: describe_file(path) for path in paths}
        if attempt is None:
            for path in paths:
                self._call(self._put_file, self._key(job_id, path.name), path)
        else:
            self._publish(job_id, attempt, [(path, described[path]) for path in checkpoint],
                          [(path, described[path]) for path in paths if path not in checkpoint])
        return [described[path] for path in paths]

    def fetch_checkpoint(self, job_id: str, directory: Path) -> bool:
        """Write the current checkpoint set (the newest attempt's, sha256 verified) into
        ``directory``; False when the job has none."""
        check_job_id(job_id)
        directory = Path(directory)
        for _ in range(FETCH_ATTEMPTS):
            manifest = self._read_manifest(job_id)
            if manifest is None:
                return self._fetch_unversioned_checkpoint(job_id, directory)
            if manifest.checkpoint is None:
                return False
            directory.mkdir(parents=True, exist_ok=True)
            written: list[tuple[Path, Path]] = []
            try:
                for entry in manifest.checkpoint:
                    temporary = directory / f".{entry.name}.{secrets.token_hex(4)}.tmp"
                    if not self._download_verified(job_id, entry, temporary):
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
        """Size and chunks of the artifact ``name`` of ``job_id`` as the job's manifest names
        it (the newest attempt's; a checkpoint file too), or None when it is missing."""
        check_job_id(job_id)
        check_name(name)
        manifest = None
        for _ in range(FETCH_ATTEMPTS):
            manifest = self._read_manifest(job_id)
            if manifest is None or manifest.format == 1:
                break  # no attempt's manifest: a dataset, or a job of before attempt prefixes
            entry = manifest.find(name)
            if entry is None:
                return None
            found = self._call(self._stream, self._object_key(job_id, entry))
            if found is not None:
                return found
        else:
            return None  # replaced under us every time
        found = self._call(self._stream, self._key(job_id, name))
        if found is not None:
            return found
        if manifest is not None:
            entry = manifest.find(name)
            return None if entry is None else self._call(self._stream, self._object_key(job_id, entry))
        return self._open_unversioned_checkpoint(job_id, name)

    def current_attempt(self, job_id: str) -> int | None:
        """The attempt whose files the job's manifest names (0: written before attempts had
        prefixes), or None when it has none."""
        manifest = self._read_manifest(job_id)
        return None if manifest is None else manifest.attempt

    def delete(self, job_id: str) -> None:
        """Remove every object of ``job_id``."""
        check_job_id(job_id)
        keys = self._call(self._list, job_id + "/")
        if keys:
            self._call(self._delete_keys, keys)

    # -- publication -----------------------------------------------------------------------

    def _publish(self, job_id: str, attempt: int, checkpoint: list[tuple[Path, ArtifactFile]],
                 artifacts: list[tuple[Path, ArtifactFile]]) -> None:
        current = self._read_tagged_manifest(job_id)
        self._refuse_stale(job_id, attempt, current[0])
        version = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        uploaded: list[str] = []
        try:
            try:
                for path, described in (*checkpoint, *artifacts):
                    key = self._object_key(job_id, Entry(described, attempt, version))
                    uploaded.append(key)
                    self._call(self._put_file, key, path)
            except StorageError:
                # A newer attempt that published meanwhile removes an older one's objects,
                # uploads under way included: say so rather than the failed upload.
                self._refuse_stale(job_id, attempt, self._read_tagged_manifest(job_id)[0])
                raise
            for _ in range(PUBLISH_TRIES):
                manifest = _next_manifest(current[0], attempt, version,
                                          [d for _, d in checkpoint], [d for _, d in artifacts])
                if self._call(self._put_if, self._manifest_key(job_id), manifest.encode(), current[1]):
                    break
                # Another write came between our read and our write: read it, and go on only
                # if it is not a newer attempt's.
                current = self._read_tagged_manifest(job_id)
                self._refuse_stale(job_id, attempt, current[0])
            else:
                raise self._error(f"the manifest of job {job_id} kept changing under "
                                  f"{PUBLISH_TRIES} conditional writes (another writer?)")
        except AttemptFenced:
            # Never referenced (our manifest write did not happen): ours to remove.
            self._remove_quietly(job_id, uploaded)
            raise
        self._remove_superseded(job_id, manifest)

    def _refuse_stale(self, job_id: str, attempt: int, current: Manifest | None) -> None:
        if current is not None and current.attempt > attempt:
            raise AttemptFenced(f"artifact store {self.url}: job {job_id} attempt {attempt} is "
                                f"stale: attempt {current.attempt} has published since; its write "
                                "is refused")

    def _remove_superseded(self, job_id: str, manifest: Manifest) -> None:
        """After ``manifest`` became current: remove what no manifest will name again, i.e.
        the objects of older attempts that it does not name, and of its own attempt those of
        older versions. A newer attempt's objects are never touched."""
        referenced = {self._object_key(job_id, entry) for entry in manifest.entries()}
        try:
            stale = []
            for key in self._list(f"{job_id}/"):
                parts = key.split("/")
                if len(parts) == 2 and parts[1] != CHECKPOINT_DIRECTORY and NAME_RE.match(parts[1]):
                    stale.append(key)  # an artifact written before attempts had prefixes
                    continue
                place = object_place(parts)
                if place is None or key in referenced:
                    continue
                owner, version = place
                if owner < manifest.attempt or (owner == manifest.attempt and version < manifest.version):
                    stale.append(key)
            if stale:
                self._delete_keys(stale)
        except Exception:  # noqa: BLE001 - the new manifest is current; leftovers go next time
            logger.warning("removing superseded objects failed", exc_info=True,
                           extra={"job_id": job_id, "store": self.url})

    def _remove_quietly(self, job_id: str, keys: list[str]) -> None:
        if not keys:
            return
        try:
            self._delete_keys(keys)
        except Exception:  # noqa: BLE001 - the next publication of a newer attempt removes them
            logger.warning("removing a stale attempt's uploads failed", exc_info=True,
                           extra={"job_id": job_id, "store": self.url})

    def _read_tagged_manifest(self, job_id: str) -> tuple[Manifest | None, str | None]:
        """The job's manifest and the tag a conditional write of it must match (None: there
        is none, create it)."""
        found = self._call(self._get_tagged, self._manifest_key(job_id))
        if found is None:
            return None, None
        data, tag = found
        try:
            return self._parse_manifest(job_id, data), tag
        except StorageError:  # an unreadable manifest is replaced (conditionally)
            return None, tag

    def _read_manifest(self, job_id: str) -> Manifest | None:
        data = self._call(self._get_bytes, self._manifest_key(job_id))
        return None if data is None else self._parse_manifest(job_id, data)

    def _parse_manifest(self, job_id: str, data: bytes) -> Manifest:
        try:
            return Manifest.decode(data)
        except (ValueError, KeyError, TypeError) as error:
            raise self._error(f"manifest of job {job_id} is invalid ({error})") from None

    def _download_verified(self, job_id: str, entry: Entry, target: Path) -> bool:
        found = self._call(self._stream, self._object_key(job_id, entry))
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
    def _object_key(job_id: str, entry: Entry) -> str:
        """Where a file a manifest names lives: ``<job>/attempt-<n>/<version>/<name>``, or,
        for attempt 0 (a manifest of before attempts), ``<job>/checkpoint/<version>/<name>``."""
        if not VERSION_RE.match(entry.version):
            raise ValueError(f"not a version: {entry.version!r}")
        folder = CHECKPOINT_DIRECTORY if entry.attempt == 0 else f"{ATTEMPT_PREFIX}{entry.attempt}"
        return f"{check_job_id(job_id)}/{folder}/{entry.version}/{check_name(entry.name)}"

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

    def _get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The bytes at ``key`` and the tag a conditional write must match, or None."""
        raise NotImplementedError

    def _put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Write ``data`` at ``key`` if it still holds what ``tag`` was read from (None: if
        there is nothing there yet); False when that changed meanwhile, and nothing written."""
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
