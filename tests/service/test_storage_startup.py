"""``metaserve serve`` and ``metaserve dispatcher`` refuse to start, with one line on stderr and
exit code 1 within seconds, when the artifact store does not answer or is misconfigured
(subprocesses; the S3 side is a real moto server on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from metaserve.service.settings import Settings
from tests.moto_s3 import MotoS3, free_port
from tests.server_process import metaserve_executable

pytestmark = pytest.mark.server  # starts `metaserve serve` / `dispatcher` processes

START_LIMIT_S = 60  # a Python start with torch/ray imports on a busy 2-core machine; the
STORE_CHECK_S = 10  # store check itself must take less than this


def metaserve(command: str, tmp_path: Path, **env: str) -> tuple[int, str, float]:
    """Runs ``metaserve COMMAND`` with a fresh embedded state in ``tmp_path``."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("METASERVE_", "AWS_"))}
    environment.update({"METASERVE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
                        "METASERVE_DATA_DIR": str(tmp_path / "state"),
                        "METASERVE_PORT": str(free_port()), **env})
    start = time.monotonic()
    process = subprocess.Popen([metaserve_executable(), command], cwd=tmp_path,
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        _, stderr = process.communicate(timeout=START_LIMIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr, time.monotonic() - start


def s3_env(moto_s3: MotoS3, **change: str) -> dict[str, str]:
    return {"METASERVE_ARTIFACT_ROOT": f"s3://{moto_s3.bucket}/artifacts",
            "METASERVE_S3_ENDPOINT_URL": moto_s3.endpoint_url,
            "METASERVE_S3_ACCESS_KEY_ID": moto_s3.access_key_id,
            "METASERVE_S3_SECRET_ACCESS_KEY": moto_s3.secret_access_key, **change}


def test_serve_with_wrong_s3_credentials_exits_1_with_one_line(moto_s3: MotoS3, tmp_path: Path) -> None:
    code, stderr, _ = metaserve("serve", tmp_path, **s3_env(
        moto_s3, METASERVE_S3_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG0"))
    assert code == 1
    assert stderr == (f"error: cannot start: artifact store s3://{moto_s3.bucket}/artifacts at "
                      f"{moto_s3.endpoint_url}: wrong credentials (InvalidAccessKeyId: The AWS "
                      "Access Key Id you provided does not exist in our records.)\n")
    assert not (tmp_path / "db.sqlite").exists()  # refused before touching anything


def test_serve_with_an_unreachable_endpoint_exits_1_with_one_line(moto_s3: MotoS3, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    code, stderr, _ = metaserve("serve", tmp_path, **s3_env(moto_s3, METASERVE_S3_ENDPOINT_URL=endpoint))
    assert code == 1
    assert stderr == (f"error: cannot start: artifact store s3://{moto_s3.bucket}/artifacts at "
                      f"{endpoint}: endpoint unreachable (connection refused)\n")


def test_dispatcher_with_a_missing_bucket_exits_1_with_one_line(moto_s3: MotoS3, tmp_path: Path) -> None:
    code, stderr, _ = metaserve("dispatcher", tmp_path, **s3_env(
        moto_s3, METASERVE_ARTIFACT_ROOT="s3://no-such-bucket/artifacts"))
    assert code == 1
    assert stderr == (f"error: cannot start: artifact store s3://no-such-bucket/artifacts at "
                      f"{moto_s3.endpoint_url}: no such bucket 'no-such-bucket' (NoSuchBucket: "
                      "The specified bucket does not exist)\n")


def test_serve_with_an_endpoint_that_never_answers_gives_up_within_seconds(moto_s3: MotoS3,
                                                                           tmp_path: Path) -> None:
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        _, baseline_stderr, baseline = metaserve("serve", tmp_path, **s3_env(
            moto_s3, METASERVE_S3_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG0"))
        code, stderr, elapsed = metaserve("serve", tmp_path, **s3_env(
            moto_s3, METASERVE_S3_ENDPOINT_URL=endpoint))
    assert code == 1
    assert stderr.count("\n") == 1 and "timed out" in stderr, stderr
    assert elapsed - baseline < STORE_CHECK_S


@pytest.mark.parametrize(("root", "message"), [
    ("s3://Bad_Bucket/x", "error: METASERVE_ARTIFACT_ROOT: 's3://Bad_Bucket/x': 'Bad_Bucket' is not "
                          "a valid S3 bucket name (3-63 characters: lowercase letters, digits, '.', '-')\n"),
    ("gs://bucket/x", "error: METASERVE_ARTIFACT_ROOT='gs://bucket/x': only a directory or an "
                      "s3://bucket/prefix URL is supported\n"),
])
def test_serve_with_a_malformed_artifact_root_exits_1_naming_the_variable(tmp_path: Path, root: str,
                                                                          message: str) -> None:
    code, stderr, _ = metaserve("serve", tmp_path, METASERVE_ARTIFACT_ROOT=root)
    assert (code, stderr) == (1, message)


def test_serve_with_an_unwritable_local_root_exits_1(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    code, stderr, _ = metaserve("serve", tmp_path, METASERVE_ARTIFACT_ROOT=str(tmp_path / "file" / "a"))
    assert (code, stderr) == (1, f"error: cannot start: artifact store {tmp_path / 'file' / 'a'}: "
                                 "not a writable directory (Not a directory)\n")


def test_settings_accept_a_path_or_an_s3_url() -> None:
    assert Settings(artifact_root=Path("/tmp/x")).artifact_root == "/tmp/x"
    assert Settings(artifact_root="./rel/dir").artifact_root == "rel/dir"
    s3 = Settings(artifact_root="s3://bucket/pre/fix", s3_endpoint_url="http://artifacts:9000/",
                  s3_access_key_id="id", s3_secret_access_key="s3cr3t-value", s3_region="eu-west-1")
    config = s3.storage_config()
    assert (config.root, config.endpoint_url, config.access_key_id, config.secret_access_key,
            config.region) == ("s3://bucket/pre/fix", "http://artifacts:9000", "id", "s3cr3t-value",
                               "eu-west-1")
    assert "s3cr3t-value" not in repr(s3) and "s3cr3t-value" not in repr(config)
    with pytest.raises(ValueError, match="METASERVE_S3_ENDPOINT_URL='artifacts:9000'"):
        Settings(s3_endpoint_url="artifacts:9000")
