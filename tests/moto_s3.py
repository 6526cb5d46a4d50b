"""A real S3 endpoint for tests: moto's server in a subprocess on 127.0.0.1 and a free port,
with credential checks on (an IAM user's key works, any other is refused) and one bucket.

Use :func:`moto_s3_server` from a session-scoped fixture; it kills the server when done.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

BUCKET = "metaserve-test"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MotoS3:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    bucket: str = BUCKET


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_s3_server() -> Iterator[MotoS3]:
    """moto on 127.0.0.1:<free port>, an IAM user with S3 rights, its key, the bucket; every
    request after the set-up must be signed with that key."""
    import boto3

    port = free_port()
    env = {**os.environ, "MOTO_PORT": str(port)}
    env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on {endpoint} did not start") from None
                time.sleep(0.1)
        setup = {"endpoint_url": endpoint, "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup", "region_name": "us-east-1"}
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="metaserve")
        iam.put_user_policy(UserName="metaserve", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="metaserve")["AccessKey"]
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        request = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=5).close()  # from now on, keys are checked
        yield MotoS3(endpoint_url=endpoint, access_key_id=key["AccessKeyId"],
                     secret_access_key=key["SecretAccessKey"])
    finally:
        process.kill()
        process.wait(timeout=10)
