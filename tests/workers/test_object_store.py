"""The artifact store, both backends through the same tests: a local directory and S3 (a real
moto server on 127.0.0.1, credentials checked)."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import stat
import time
import uuid
from pathlib import Path

import pytest

from metaserve.workers.object_store import (
    CHECKPOINT_DIRECTORY,
    MANIFEST_NAME,
    ArtifactFile,
    LocalStore,
    S3Store,
    StorageConfig,
    StorageError,
    open_store,
)
from tests.moto_s3 import MotoS3, free_port

JOB = "job_1"


def s3_config(moto_s3: MotoS3, **change: str) -> StorageConfig:
    values = {"root": f"s3://{moto_s3.bucket}/{uuid.uuid4().hex}", "endpoint_url": moto_s3.endpoint_url,
              "access_key_id": moto_s3.access_key_id, "secret_access_key": moto_s3.secret_access_key}
    return StorageConfig(**{**values, **change})


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path):  # noqa: ANN001, ANN201
    if request.param == "local":
        return open_store(StorageConfig(root=str(tmp_path / "artifacts")))
    return open_store(s3_config(request.getfixturevalue("moto_s3")))


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def checkpoint_files(directory: Path, tag: bytes) -> list[Path]:
    return [write(directory / CHECKPOINT_DIRECTORY / "checkpoint.safetensors", b"tensors " + tag * 1000),
            write(directory / CHECKPOINT_DIRECTORY / "checkpoint.json", b'{"iteration": "' + tag + b'"}')]


def read(store, name: str, job_id: str = JOB) -> bytes | None:  # noqa: ANN001
    found = store.open(job_id, name)
    if found is None:
        return None
    size, chunks = found
    data = b"".join(chunks)
    assert len(data) == size
    return data


def fetched(store, tmp_path: Path) -> dict[str, bytes] | None:  # noqa: ANN001
    directory = tmp_path / f"fetch-{uuid.uuid4().hex[:6]}"
    if not store.fetch_checkpoint(JOB, directory):
        return None
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_open_store_picks_the_backend_from_the_root(tmp_path: Path, moto_s3: MotoS3) -> None:
    assert isinstance(open_store(StorageConfig(root=str(tmp_path))), LocalStore)
    assert isinstance(open_store(StorageConfig(root="./relative/dir")), LocalStore)
    assert isinstance(open_store(s3_config(moto_s3)), S3Store)
    with pytest.raises(ValueError, match="directory or an s3://bucket/prefix URL"):
        open_store(StorageConfig(root="ftp://host/dir"))
    with pytest.raises(ValueError, match="not a valid S3 bucket name"):
        open_store(StorageConfig(root="s3://Bad_Bucket/x"))
    with pytest.raises(ValueError, match="prefix part '..' is not allowed"):
        open_store(StorageConfig(root="s3://bucket/a/../b"))


def test_put_then_open_returns_the_bytes_and_their_sha256(store, tmp_path: Path) -> None:  # noqa: ANN001
    data = os.urandom(3 * (1 << 20) + 17)  # more than one chunk
    meta = write(tmp_path / "out" / "meta_init.safetensors", data)
    recipe = write(tmp_path / "out" / "meta_init.json", b'{"recipe": 1}')
    described = store.put(JOB, [meta, recipe])
    assert described == [
        ArtifactFile("meta_init.safetensors", len(data), hashlib.sha256(data).hexdigest(),
                     "application/octet-stream"),
        ArtifactFile("meta_init.json", 13, hashlib.sha256(b'{"recipe": 1}').hexdigest(),
                     "application/json")]
    assert read(store, "meta_init.safetensors") == data
    assert read(store, "meta_init.json") == b'{"recipe": 1}'
    assert store.open(JOB, "meta_policy.json") is None
    assert store.open("other_job", "meta_init.json") is None


def test_put_replaces_an_artifact_whole(store, tmp_path: Path) -> None:  # noqa: ANN001
    store.put(JOB, [write(tmp_path / "a" / "meta_init.json", b"old" * 100)])
    store.put(JOB, [write(tmp_path / "b" / "meta_init.json", b"new")])
    assert read(store, "meta_init.json") == b"new"


def test_checkpoint_set_round_trip(store, tmp_path: Path) -> None:  # noqa: ANN001
    assert store.fetch_checkpoint(JOB, tmp_path / "none") is False
    files = checkpoint_files(tmp_path / "run", b"1")
    described = store.put(JOB, files, attempt=1)
    assert [d.name for d in described] == ["checkpoint.safetensors", "checkpoint.json"]
    assert fetched(store, tmp_path) == {path.name: path.read_bytes() for path in files}
    assert read(store, "checkpoint.json") == b'{"iteration": "1"}'
    assert read(store, MANIFEST_NAME) is None  # the manifest is no artifact


def objects(store) -> list[str]:  # noqa: ANN001
    """The job's keys but the manifest (and the local store's lock beside it)."""
    return [key for key in store._list(f"{JOB}/") if f"/{CHECKPOINT_DIRECTORY}/" not in key
            or key.count("/") == 3]


def test_a_new_checkpoint_set_replaces_the_old_one_and_its_objects(store, tmp_path: Path) -> None:  # noqa: ANN001
    store.put(JOB, checkpoint_files(tmp_path / "one", b"1"), attempt=1)
    second = checkpoint_files(tmp_path / "two", b"2")
    store.put(JOB, second, attempt=1)
    assert fetched(store, tmp_path) == {path.name: path.read_bytes() for path in second}
    keys = store._list(f"{JOB}/")
    assert f"{JOB}/{CHECKPOINT_DIRECTORY}/{MANIFEST_NAME}" in keys
    assert len(objects(store)) == 2, keys  # the current set, nothing of the first
    assert all(key.startswith(f"{JOB}/attempt-1/") for key in objects(store))


def test_crash_between_upload_and_manifest_leaves_the_previous_set(store, tmp_path: Path,  # noqa: ANN001
                                                                   monkeypatch) -> None:  # noqa: ANN001
    first = checkpoint_files(tmp_path / "one", b"1")
    store.put(JOB, first, attempt=1)

    def crash_on_manifest(key: str, data: bytes, tag: str | None) -> bool:
        raise OSError("process killed")

    monkeypatch.setattr(store, "_put_if", crash_on_manifest)
    with pytest.raises(StorageError, match="process killed"):
        store.put(JOB, checkpoint_files(tmp_path / "two", b"2"), attempt=1)
    monkeypatch.undo()
    expected = {path.name: path.read_bytes() for path in first}
    assert fetched(store, tmp_path) == expected
    assert read(store, "checkpoint.json") == expected["checkpoint.json"]
    third = checkpoint_files(tmp_path / "three", b"3")
    store.put(JOB, third, attempt=1)  # the orphaned upload goes with the next publication
    assert len(objects(store)) == 2
    assert fetched(store, tmp_path) == {path.name: path.read_bytes() for path in third}


def test_a_reader_during_a_publication_sees_the_previous_complete_set(store, tmp_path: Path,  # noqa: ANN001
                                                                      monkeypatch) -> None:  # noqa: ANN001
    first = checkpoint_files(tmp_path / "one", b"1")
    store.put(JOB, first, attempt=1)
    seen = []
    real_put_file = store._put_file

    def read_between_uploads(key: str, path: Path) -> None:
        real_put_file(key, path)
        seen.append(fetched(store, tmp_path))

    monkeypatch.setattr(store, "_put_file", read_between_uploads)
    second = checkpoint_files(tmp_path / "two", b"2")
    store.put(JOB, second, attempt=1)
    expected_first = {path.name: path.read_bytes() for path in first}
    assert seen == [expected_first, expected_first]
    assert fetched(store, tmp_path) == {path.name: path.read_bytes() for path in second}


def test_fetch_checkpoint_refuses_a_tampered_object(store, tmp_path: Path) -> None:  # noqa: ANN001
    store.put(JOB, checkpoint_files(tmp_path / "run", b"1"), attempt=1)
    [key] = [key for key in store._list(f"{JOB}/") if key.endswith("checkpoint.safetensors")]
    store._put_bytes(key, b"planted")
    target = tmp_path / "resume"
    with pytest.raises(StorageError) as raised:
        store.fetch_checkpoint(JOB, target)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"artifact store {store.url}: checkpoint file checkpoint.safetensors "
                              f"of job {JOB} does not match its manifest")
    assert not target.exists() or list(target.iterdir()) == []  # nothing half-written left


@pytest.mark.parametrize("name", ["../x", "a/b", "/etc/passwd", "..", ".", "", ".hidden",
                                  "checkpoint", "attempt-2", "a\\b", "x\x00y"])
def test_names_that_could_leave_the_job_prefix_are_refused(store, tmp_path: Path, name: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="not an artifact file name"):
        store.open(JOB, name)


@pytest.mark.parametrize("job_id", ["../x", "a/b", "", "x" * 65, "/abs", "a.b"])
def test_job_ids_that_are_not_ids_are_refused(store, tmp_path: Path, job_id: str) -> None:  # noqa: ANN001
    path = write(tmp_path / "meta_init.json", b"{}")
    for call in (lambda: store.open(job_id, "meta_init.json"), lambda: store.put(job_id, [path]),
                 lambda: store.fetch_checkpoint(job_id, tmp_path / "x"), lambda: store.delete(job_id)):
        with pytest.raises(ValueError, match="not a job id"):
            call()


def test_put_refuses_a_file_name_that_is_not_plain(store, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="not an artifact file name"):
        store.put(JOB, [write(tmp_path / ".hidden", b"x")])
    assert store._list(f"{JOB}/") == []


def test_delete_removes_every_object_of_the_job(store, tmp_path: Path) -> None:  # noqa: ANN001
    store.put(JOB, [write(tmp_path / "meta_init.json", b"{}"), *checkpoint_files(tmp_path, b"1")], attempt=1)
    store.put("other", [write(tmp_path / "o" / "meta_init.json", b"[]")])
    store.delete(JOB)
    assert store._list(f"{JOB}/") == []
    assert store.open(JOB, "meta_init.json") is None
    assert store.fetch_checkpoint(JOB, tmp_path / "resume") is False
    assert read(store, "meta_init.json", "other") == b"[]"
    store.delete("never_existed")


def test_check_passes_on_a_working_store(store) -> None:  # noqa: ANN001
    store.check()


def test_config_and_store_travel_by_pickle_without_showing_the_secret(store, tmp_path: Path) -> None:  # noqa: ANN001
    assert "secret_access_key" not in repr(store.config)
    copy = pickle.loads(pickle.dumps(store))
    copy.put(JOB, [write(tmp_path / "meta_init.json", b"{}")])
    assert read(store, "meta_init.json") == b"{}"


# -- S3 failures: one line naming the store and the cause, within seconds -------------------


def check_error(config: StorageConfig) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(StorageError) as raised:
        open_store(config).check()
    return str(raised.value), time.monotonic() - start


def test_wrong_credentials_are_one_readable_line(moto_s3: MotoS3) -> None:
    config = s3_config(moto_s3, access_key_id="AKIAWRONGWRONGWRONG0", secret_access_key="nope")
    message, elapsed = check_error(config)
    assert message == (f"artifact store {config.root} at {moto_s3.endpoint_url}: wrong credentials "
                       "(InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in "
                       "our records.)")
    assert elapsed < 5
    message, _ = check_error(s3_config(moto_s3, secret_access_key="wrong-secret"))
    assert "wrong credentials (SignatureDoesNotMatch" in message and "\n" not in message


def test_a_missing_bucket_is_one_readable_line(moto_s3: MotoS3) -> None:
    config = s3_config(moto_s3, root="s3://no-such-bucket/prefix")
    message, elapsed = check_error(config)
    assert message == (f"artifact store s3://no-such-bucket/prefix at {moto_s3.endpoint_url}: no such "
                       "bucket 'no-such-bucket' (NoSuchBucket: The specified bucket does not exist)")
    assert elapsed < 5


def test_an_unreachable_endpoint_is_one_readable_line(moto_s3: MotoS3) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = s3_config(moto_s3, endpoint_url=endpoint)
    message, elapsed = check_error(config)
    assert message == (f"artifact store {config.root} at {endpoint}: endpoint unreachable "
                       "(connection refused)")
    assert elapsed < 5


def test_an_endpoint_that_never_answers_fails_the_check_within_seconds(moto_s3: MotoS3) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        message, elapsed = check_error(s3_config(moto_s3, endpoint_url=endpoint))
    assert "\n" not in message and message.startswith("artifact store s3://")
    assert "timed out" in message
    assert elapsed < 8


def test_operations_on_a_broken_store_raise_storage_error(moto_s3: MotoS3, tmp_path: Path) -> None:
    store = open_store(s3_config(moto_s3, access_key_id="AKIAWRONGWRONGWRONG0"))
    with pytest.raises(StorageError, match="wrong credentials"):
        store.open(JOB, "meta_init.json")
    with pytest.raises(StorageError, match="wrong credentials"):
        store.put(JOB, [write(tmp_path / "meta_init.json", b"{}")])
    with pytest.raises(StorageError, match="wrong credentials"):
        store.fetch_checkpoint(JOB, tmp_path / "resume")


# -- the local backend: the embedded default's layout and permissions -----------------------


def test_local_store_keeps_artifacts_at_root_job_name_private(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    store = open_store(StorageConfig(root=str(root)))
    store.put(JOB, [write(tmp_path / "out" / "meta_init.json", b"{}"),
                    *checkpoint_files(tmp_path / "out", b"1")], attempt=1)
    [recipe] = (root / JOB / "attempt-1").glob("*/meta_init.json")
    assert recipe.read_bytes() == b"{}"
    for path in [root / JOB, *(root / JOB).rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert not [p for p in (root / JOB).rglob("*.tmp")]


def test_local_store_publishes_files_written_in_place(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    store = open_store(StorageConfig(root=str(root)))
    in_place = write(root / JOB / "meta_init.json", b"{}")
    assert store.put(JOB, [in_place])[0].size == 2
    assert read(store, "meta_init.json") == b"{}"


def test_local_store_reads_a_checkpoint_written_before_manifests(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    store = open_store(StorageConfig(root=str(root)))
    legacy = checkpoint_files(root / JOB, b"0")  # <root>/<job>/checkpoint/checkpoint.*, no manifest
    assert read(store, "checkpoint.json") == b'{"iteration": "0"}'
    assert fetched(store, tmp_path) == {path.name: path.read_bytes() for path in legacy}
    assert store.fetch_checkpoint(JOB, root / JOB / CHECKPOINT_DIRECTORY) is True  # in place: a no-op
    newer = checkpoint_files(tmp_path / "run", b"1")
    store.put(JOB, newer, attempt=1)  # a manifest now decides
    assert fetched(store, tmp_path) == {path.name: path.read_bytes() for path in newer}


def test_local_store_does_not_follow_links(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    secret = write(tmp_path / "secret.txt", b"not yours")
    (root / JOB).mkdir(parents=True)
    (root / JOB / "link.json").symlink_to(secret)
    store = open_store(StorageConfig(root=str(root)))
    assert store.open(JOB, "link.json") is None


def test_local_check_fails_when_the_root_is_not_a_writable_directory(tmp_path: Path) -> None:
    blocker = write(tmp_path / "file", b"")
    with pytest.raises(StorageError) as raised:
        open_store(StorageConfig(root=str(blocker / "artifacts"))).check()
    assert str(raised.value) == f"artifact store {blocker / 'artifacts'}: not a writable directory (Not a directory)"
