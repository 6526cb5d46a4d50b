"""The local backend of the artifact store: a directory on this host (the embedded default, or
a shared mount)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metaserve.workers.object_store.base import (ATTEMPT_RE, CHECKPOINT_DIRECTORY, CHUNK_BYTES, MANIFEST_NAME, NAME_RE,
                                                 ArtifactStore, StorageConfig, check_job_id, private_file,
                                                 version_of)


class LocalStore(ArtifactStore):
    """A directory on this host (the embedded default, or a shared mount): files 0600,
    directories 0700, every write a temporary file + ``os.replace``."""

    def __init__(self, config: StorageConfig):
        self.config = config
        self.root = Path(config.root).expanduser().resolve()
        self.url = self.location = str(self.root)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            with tempfile.TemporaryFile(dir=self.root, prefix=".check-"):
                pass
        except OSError as error:
            raise self._error(f"not a writable directory ({error.strerror or error})") from None

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samefile(path, target):
                return  # written in place (a runner working in the store's own directory)
        self._write(target, lambda handle: _copy_into(path, handle))

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._write(self._path(key), lambda handle: handle.write(data))

    def _write(self, target: Path, fill) -> None:  # noqa: ANN001
        self._make_dirs(target.parent)
        temporary = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        with private_file(temporary) as handle:
            fill(handle)
        try:
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def _make_dirs(self, directory: Path) -> None:
        missing = []
        while not directory.exists() and directory != self.root.parent:
            missing.append(directory)
            directory = directory.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700)

    def _open_regular(self, path: Path) -> tuple[int, int] | None:
        """``(descriptor, size)`` of a regular file that is not a link, or None."""
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as error:
            if error.errno == 40:  # ELOOP: a symbolic link is not an artifact
                return None
            raise
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            os.close(descriptor)
            return None
        return descriptor, info.st_size

    def _get_bytes(self, key: str) -> bytes | None:
        opened = self._open_regular(self._path(key))
        if opened is None:
            return None
        with os.fdopen(opened[0], "rb") as handle:
            return handle.read()

    def _stream(self, key: str) -> tuple[int, Iterator[bytes]] | None:
        opened = self._open_regular(self._path(key))
        if opened is None:
            return None
        descriptor, size = opened
        handle = os.fdopen(descriptor, "rb")

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(CHUNK_BYTES):
                    yield chunk

        return size, chunks()

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        return sorted(path.relative_to(self.root).as_posix() for path in base.rglob("*")
                      if path.is_file() and not path.is_symlink())

    def _delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        for key in keys:  # empty version directories too, and an attempt's when empty
            parent = self._path(key).parent
            if version_of(key.split("/")) is not None:
                with contextlib.suppress(OSError):
                    parent.rmdir()
                if ATTEMPT_RE.match(parent.parent.name):
                    with contextlib.suppress(OSError):
                        parent.parent.rmdir()

    def _get_tagged(self, key: str) -> tuple[bytes, str] | None:
        data = self._get_bytes(key)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def _put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Compare and replace under an exclusive ``flock`` of ``.<name>.lock`` beside the
        file, which every conditional writer of this key on this host (or on a shared
        mount whose file system honours flock) takes."""
        target = self._path(key)
        self._make_dirs(target.parent)
        lock = target.parent / f".{target.name}.lock"
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            current = self._get_tagged(key)
            if (current[1] if current is not None else None) != tag:
                return False
            self._write(target, lambda handle: handle.write(data))
            return True
        finally:
            os.close(descriptor)  # releases the lock

    def delete(self, job_id: str) -> None:
        directory = self._path(check_job_id(job_id))
        try:
            shutil.rmtree(directory)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise self._error(f"deleting job {job_id}: {error.strerror or error}") from None

    # Checkpoints written in place by a runner, as before the store had manifests:
    # <job_id>/checkpoint/checkpoint.safetensors + checkpoint.json, no manifest.

    def _unversioned_files(self, job_id: str) -> list[Path]:
        directory = self._path(f"{job_id}/{CHECKPOINT_DIRECTORY}")
        try:
            entries = sorted(directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [entry for entry in entries if NAME_RE.match(entry.name) and entry.name != MANIFEST_NAME
                and entry.is_file() and not entry.is_symlink()]

    def _fetch_unversioned_checkpoint(self, job_id: str, directory: Path) -> bool:
        files = self._unversioned_files(job_id)
        if not files:
            return False
        directory.mkdir(parents=True, exist_ok=True)
        for path in files:
            target = directory / path.name
            with contextlib.suppress(FileNotFoundError):
                if os.path.samefile(path, target):
                    continue
            temporary = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
            with private_file(temporary) as handle:
                _copy_into(path, handle)
            os.replace(temporary, target)
        return True

    def _open_unversioned_checkpoint(self, job_id: str, name: str) -> tuple[int, Iterator[bytes]] | None:
        if name == MANIFEST_NAME:
            return None
        return self._stream(f"{job_id}/{CHECKPOINT_DIRECTORY}/{name}")


def _copy_into(path: Path, handle: Any) -> None:
    with open(path, "rb") as source:
        shutil.copyfileobj(source, handle, CHUNK_BYTES)
