"""Fenced publication in the artifact store, both backends (a local directory and a real moto
S3 server): attempts of one job publish under their own prefixes and make them current with a
conditional manifest write, so a stale attempt never replaces, or deletes, a newer one's."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest

from metaserve.workers.object_store import (CHECKPOINT_DIRECTORY, MANIFEST_NAME, AttemptFenced, StorageConfig,
                                            open_store)
from tests.moto_s3 import MotoS3
from tests.workers.test_object_store import JOB, checkpoint_files, fetched, read, s3_config, write


@pytest.fixture(params=["local", "s3"])
def config(request, tmp_path: Path) -> StorageConfig:  # noqa: ANN001
    if request.param == "local":
        return StorageConfig(root=str(tmp_path / "artifacts"))
    moto_s3: MotoS3 = request.getfixturevalue("moto_s3")
    return s3_config(moto_s3)


def artifact_files(directory: Path, tag: bytes) -> list[Path]:
    return [write(directory / "meta_init.safetensors", b"weights " + tag * 500),
            write(directory / "meta_init.json", b'{"attempt": "' + tag + b'"}')]


def object_attempts(store) -> set[str]:  # noqa: ANN001
    """The attempt folders holding objects of the job (the manifest's folder aside)."""
    return {key.split("/")[1] for key in store._list(f"{JOB}/")
            if key.split("/")[1] != CHECKPOINT_DIRECTORY}


def manifest(store) -> dict:  # noqa: ANN001
    return json.loads(store._get_bytes(f"{JOB}/{CHECKPOINT_DIRECTORY}/{MANIFEST_NAME}"))


def test_a_stale_attempt_is_refused_and_leaves_nothing(config: StorageConfig, tmp_path: Path) -> None:
    store = open_store(config)
    newer = checkpoint_files(tmp_path / "two", b"2")
    store.put(JOB, newer, attempt=2)
    with pytest.raises(AttemptFenced, match=f"job {JOB} attempt 1 is stale: attempt 2 has published"):
        store.put(JOB, checkpoint_files(tmp_path / "one", b"1"), attempt=1)
    with pytest.raises(AttemptFenced):
        store.put(JOB, artifact_files(tmp_path / "one", b"1"), attempt=1)
    assert object_attempts(store) == {"attempt-2"}
    assert fetched(store, tmp_path) == {path.name: path.read_bytes() for path in newer}
    assert read(store, "meta_init.json") is None
    assert store.current_attempt(JOB) == 2


def test_a_stale_attempt_racing_the_newer_one_loses_and_cleans_up(config: StorageConfig, tmp_path: Path,
                                                                  monkeypatch) -> None:  # noqa: ANN001
    """Attempt 1 has read the manifest and uploaded its set when attempt 2 publishes (and
    removes attempt 1's older objects); attempt 1's conditional write then fails, it reads the
    manifest again, is refused, and removes what it uploaded."""
    stale, newer_store = open_store(config), open_store(config)
    stale.put(JOB, checkpoint_files(tmp_path / "zero", b"0"), attempt=1)
    real_put_if = stale._put_if
    newer = checkpoint_files(tmp_path / "two", b"2")
    raced = []

    def newer_attempt_first(key: str, data: bytes, tag: str | None) -> bool:
        if not raced:
            raced.append(newer_store.put(JOB, newer + artifact_files(tmp_path / "two", b"2"), attempt=2))
        return real_put_if(key, data, tag)

    monkeypatch.setattr(stale, "_put_if", newer_attempt_first)
    with pytest.raises(AttemptFenced):
        stale.put(JOB, checkpoint_files(tmp_path / "one", b"1") + artifact_files(tmp_path / "one", b"1"),
                  attempt=1)
    assert raced
    assert object_attempts(stale) == {"attempt-2"}
    assert len(stale._list(f"{JOB}/attempt-2/")) == 4
    assert fetched(stale, tmp_path) == {path.name: path.read_bytes() for path in newer}
    assert read(stale, "meta_init.json") == b'{"attempt": "2"}'
    assert manifest(stale)["attempt"] == 2


def test_a_resumed_attempt_keeps_the_checkpoint_it_resumed_from(config: StorageConfig, tmp_path: Path) -> None:
    """Attempt 1 checkpointed at the last iteration (and published an artifact) and died;
    attempt 2 resumes there and publishes only its artifact: the checkpoint stays current,
    attempt 1's artifact goes."""
    store = open_store(config)
    first = checkpoint_files(tmp_path / "one", b"1")
    store.put(JOB, first + artifact_files(tmp_path / "one", b"1"), attempt=1)
    store.put(JOB, artifact_files(tmp_path / "two", b"2"), attempt=2)
    assert fetched(store, tmp_path) == {path.name: path.read_bytes() for path in first}
    assert read(store, "meta_init.json") == b'{"attempt": "2"}'
    assert len(store._list(f"{JOB}/attempt-1/")) == 2  # the checkpoint set only
    assert len(store._list(f"{JOB}/attempt-2/")) == 2
    store.put(JOB, checkpoint_files(tmp_path / "three", b"3"), attempt=2)
    assert object_attempts(store) == {"attempt-2"}
    assert read(store, "meta_init.json") == b'{"attempt": "2"}'  # same attempt: kept


def test_a_manifest_of_before_attempts_is_read_then_replaced(config: StorageConfig, tmp_path: Path) -> None:
    store = open_store(config)
    legacy = checkpoint_files(tmp_path / "old", b"0")
    version = "00000000000000000001-abcdef01"
    files = []
    for path in legacy:
        store._put_file(f"{JOB}/{CHECKPOINT_DIRECTORY}/{version}/{path.name}", path)
        described = __import__("metaserve.workers.object_store", fromlist=["describe_file"]).describe_file(path)
        files.append({"name": described.name, "size": described.size, "sha256": described.sha256,
                      "media_type": described.media_type})
    store._put_bytes(f"{JOB}/{CHECKPOINT_DIRECTORY}/{MANIFEST_NAME}",
                     json.dumps({"format": 1, "version": version, "files": files}).encode())
    assert fetched(store, tmp_path) == {path.name: path.read_bytes() for path in legacy}
    assert store.current_attempt(JOB) == 0
    newer = checkpoint_files(tmp_path / "new", b"1")
    store.put(JOB, newer, attempt=1)
    assert fetched(store, tmp_path) == {path.name: path.read_bytes() for path in newer}
    assert object_attempts(store) == {"attempt-1"}
    assert [key for key in store._list(f"{JOB}/{CHECKPOINT_DIRECTORY}/") if version in key] == []


def test_two_attempts_writing_at_once_leave_exactly_one_attempts_checkpoint_and_artifact(
        config: StorageConfig, tmp_path: Path) -> None:
    """Two attempts of one job (each its own client) publish checkpoints and then their
    artifact at the same time, while a reader resumes again and again: every read is one
    complete set of one attempt; at the end the store holds the newest attempt's last
    checkpoint and its artifact, and nothing of the other."""
    rounds = 6
    start = threading.Barrier(3)
    outcomes: dict[int, object] = {}
    reads: list[dict[str, bytes] | None] = []
    done = threading.Event()

    def attempt(number: int) -> None:
        store = open_store(config)
        start.wait()
        try:
            for index in range(rounds):
                tag = f"{number}.{index}".encode()
                store.put(JOB, checkpoint_files(tmp_path / f"a{number}-{index}", tag), attempt=number)
            store.put(JOB, artifact_files(tmp_path / f"a{number}-final", str(number).encode()), attempt=number)
            outcomes[number] = "published"
        except AttemptFenced as error:
            outcomes[number] = error
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            outcomes[number] = repr(error)

    def reader() -> None:
        store = open_store(config)
        start.wait()
        while not done.is_set():
            directory = tmp_path / f"read-{uuid.uuid4().hex[:8]}"
            if store.fetch_checkpoint(JOB, directory):
                reads.append({path.name: path.read_bytes() for path in directory.iterdir()})

    threads = [threading.Thread(target=attempt, args=(number,)) for number in (1, 2)]
    watcher = threading.Thread(target=reader)
    for thread in (*threads, watcher):
        thread.start()
    for thread in threads:
        thread.join(120)
    done.set()
    watcher.join(60)
    assert outcomes[2] == "published", outcomes
    assert outcomes[1] == "published" or isinstance(outcomes[1], AttemptFenced), outcomes
    for seen in reads:  # one complete set: both files carry the same tag
        tag = json.loads(seen["checkpoint.json"])["iteration"].encode()
        assert seen["checkpoint.safetensors"] == b"tensors " + tag * 1000
    store = open_store(config)
    assert manifest(store)["attempt"] == 2
    assert object_attempts(store) == {"attempt-2"}
    assert len(store._list(f"{JOB}/attempt-2/")) == 4  # its last checkpoint set + its artifact
    final = fetched(store, tmp_path)
    assert final is not None and json.loads(final["checkpoint.json"])["iteration"] == f"2.{rounds - 1}"
    assert read(store, "meta_init.json") == b'{"attempt": "2"}'
    assert read(store, "meta_init.safetensors") == b"weights " + b"2" * 500
