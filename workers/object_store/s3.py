"""The S3 backend of the artifact store (AWS, MinIO, Ceph, ... via ``endpoint_url``), through
obstore (chosen by measurement: docs/notes/object-storage-client.md), imported on use."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from metaserve.workers.object_store.base import (CHECK_TIMEOUT_S, CHUNK_BYTES, CONNECT_TIMEOUT_S, PART_BYTES,
                                                 REQUEST_TIMEOUT_S, RETRY_TIMEOUT_S, TRANSFER_RETRIES,
                                                 ArtifactStore, StorageConfig, first_line,
                                                 parse_s3_url)


_S3_CODE_RE = re.compile(r"<Code>([^<]+)</Code>")
_S3_MESSAGE_RE = re.compile(r"<Message>([^<]+)</Message>")
_STATUS_RE = re.compile(r"status code: (\d{3})")
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId",
                     "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}


class S3Store(ArtifactStore):
    """An S3 bucket (AWS, MinIO, Ceph, ... via ``endpoint_url``), through obstore. A single PUT
    is atomic on S3: an artifact is replaced whole or not at all."""

    def __init__(self, config: StorageConfig):
        self.config = config
        self.bucket, self.prefix = parse_s3_url(config.root)
        self.endpoint = config.endpoint_url or "AWS"
        where = self.location = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.url = where if not config.endpoint_url else f"{where} at {config.endpoint_url}"
        self._store = self._make_store(check=False)
        self._check_store = self._make_store(check=True)

    def __getstate__(self) -> dict:
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])

    def _make_store(self, *, check: bool) -> Any:
        from obstore.store import S3Store as ObstoreS3

        options: dict[str, Any] = {}
        if self.config.endpoint_url:
            options["endpoint"] = self.config.endpoint_url
        if self.config.access_key_id:
            options["access_key_id"] = self.config.access_key_id
            options["secret_access_key"] = self.config.secret_access_key
        client = {"connect_timeout": f"{CONNECT_TIMEOUT_S:g}s",
                  "timeout": f"{CHECK_TIMEOUT_S if check else REQUEST_TIMEOUT_S:g}s",
                  "allow_http": self.config.endpoint_url.startswith("http://")}
        retry = {"max_retries": 0 if check else TRANSFER_RETRIES,
                 "backoff": {"init_backoff": timedelta(milliseconds=100),
                             "max_backoff": timedelta(seconds=5), "base": 2.0},
                 "retry_timeout": timedelta(seconds=CHECK_TIMEOUT_S if check else RETRY_TIMEOUT_S)}
        try:
            return ObstoreS3(self.bucket, prefix=self.prefix or None, region=self.config.region,
                             client_options=client, retry_config=retry, **options)
        except Exception as error:  # noqa: BLE001 - a malformed endpoint URL, say
            raise self._error(self._describe(error)) from None

    def check(self) -> None:
        """GET of a key that need not exist: 404 NoSuchKey means reachable, authorized and
        the bucket exists; anything else is the error."""
        import obstore

        try:
            obstore.get(self._check_store, ".metaserve-check").bytes()
        except FileNotFoundError as error:  # NoSuchKey: fine
            if "NoSuchBucket" in str(error):
                raise self._error(self._describe(error)) from None
        except Exception as error:  # noqa: BLE001
            raise self._error(self._describe(error)) from None

    def _describe(self, error: BaseException) -> str:
        text = str(error)
        code = _S3_CODE_RE.search(text)
        message = _S3_MESSAGE_RE.search(text)
        status = _STATUS_RE.search(text)
        if "169.254.169.254" in text:  # no keys given: the instance metadata service was asked
            cause = f"HTTP {status.group(1)}" if status else _reqwest_cause(text)
            return f"no credentials: none configured, and none from the instance metadata service ({cause})"
        detail = f"{code.group(1)}: {message.group(1)}" if code and message else None
        if code and code.group(1) == "NoSuchBucket":
            return f"no such bucket {self.bucket!r} ({detail})"
        if code and code.group(1) in _CREDENTIAL_CODES:
            return f"wrong credentials ({detail})"
        if code and code.group(1) == "AccessDenied":
            return f"access denied ({detail})"
        if status and status.group(1) == "403":
            return "access denied (HTTP 403: wrong credentials?)"
        lowered = text.lower()
        if "error sending request" in lowered or "connect" in lowered or "dns" in lowered:
            return f"endpoint unreachable ({_reqwest_cause(text)})"
        if "timed out" in lowered or "timeout" in lowered:
            return f"no answer within {CHECK_TIMEOUT_S:g}s (timed out)"
        if detail:
            return detail
        return first_line(f"{type(error).__name__}: {text}")

    def _put_file(self, key: str, path: Path) -> None:
        import obstore

        obstore.put(self._store, key, Path(path), chunk_size=PART_BYTES)

    def _put_bytes(self, key: str, data: bytes) -> None:
        import obstore

        obstore.put(self._store, key, data, use_multipart=False)

    def _get(self, key: str):  # noqa: ANN202 - obstore's GetResult, or None
        """The object at ``key``, or None when there is none (a missing bucket is an error)."""
        import obstore

        try:
            return obstore.get(self._store, key)
        except FileNotFoundError as error:
            if "NoSuchBucket" in str(error):
                raise
            return None

    def _get_bytes(self, key: str) -> bytes | None:
        result = self._get(key)
        return None if result is None else bytes(result.bytes())

    def _stream(self, key: str) -> tuple[int, Iterator[bytes]] | None:
        result = self._get(key)
        if result is None:
            return None
        size = int(result.meta["size"])

        def chunks() -> Iterator[bytes]:
            for chunk in result.stream(min_chunk_size=CHUNK_BYTES):
                yield bytes(chunk)

        return size, self._iterate(chunks())

    def _list(self, prefix: str) -> list[str]:
        import obstore

        keys: list[str] = []
        for batch in obstore.list(self._store, prefix=prefix):
            keys.extend(entry["path"] for entry in batch)
        return sorted(keys)

    def _delete_keys(self, keys: list[str]) -> None:
        import obstore

        obstore.delete(self._store, keys)

    def _get_tagged(self, key: str) -> tuple[bytes, str] | None:
        result = self._get(key)
        if result is None:
            return None
        tag = result.meta.get("e_tag")
        if not tag:
            raise self._error(f"{key}: the endpoint sends no ETag, so the manifest cannot be "
                              "written conditionally")
        return bytes(result.bytes()), tag

    def _put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """One PUT with ``If-None-Match: *`` (no tag) or ``If-Match: <tag>``: S3 (since
        2024), MinIO, Ceph and moto refuse it with 412 when the object changed meanwhile."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        mode: Any = "create" if tag is None else {"e_tag": tag}
        try:
            obstore.put(self._store, key, data, mode=mode, use_multipart=False)
        except (AlreadyExistsError, PreconditionError):
            return False
        return True


def _reqwest_cause(text: str) -> str:
    lowered = text.lower()
    if "connection refused" in lowered or "kind: connect" in lowered:
        return "connection refused"
    if "timed out" in lowered or "timeout" in lowered:
        return "timed out"
    if "dns" in lowered:
        return "name not resolved"
    return "error sending request"
