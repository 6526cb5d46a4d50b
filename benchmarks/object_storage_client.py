"""Which S3 client for workers/object_store/s3.py: boto3, fsspec+s3fs or obstore, measured against a
local moto server (put/get of a 1 MB and a 50 MB file; the small-object round trip = put +
head + get of 200 bytes, as a checkpoint manifest or an availability check does).

    .venv/bin/python benchmarks/object_storage_client.py --repeat 5 > benchmarks/results/object_storage_client.json

Each figure is the median and the range over ``--repeat`` runs, in milliseconds; every client
talks to the same moto server (one process, started here on 127.0.0.1 and a free port).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BUCKET = "bench"
KEY_ID, SECRET = "testing", "testing"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return process, endpoint
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto server did not start")


def boto3_client(endpoint: str):  # noqa: ANN201
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID,
                          aws_secret_access_key=SECRET, region_name="us-east-1",
                          config=Config(retries={"max_attempts": 2}))

    def put(key: str, path: Path) -> None:
        client.upload_file(str(path), BUCKET, key)

    def get(key: str, path: Path) -> None:
        client.download_file(BUCKET, key, str(path))

    def small(key: str, data: bytes) -> bytes:
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
        client.head_object(Bucket=BUCKET, Key=key)
        return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    return put, get, small


def s3fs_client(endpoint: str):  # noqa: ANN201
    import s3fs

    fs = s3fs.S3FileSystem(key=KEY_ID, secret=SECRET, endpoint_url=endpoint,
                           client_kwargs={"region_name": "us-east-1"}, skip_instance_cache=True)

    def put(key: str, path: Path) -> None:
        fs.put_file(str(path), f"{BUCKET}/{key}")

    def get(key: str, path: Path) -> None:
        fs.get_file(f"{BUCKET}/{key}", str(path))

    def small(key: str, data: bytes) -> bytes:
        fs.pipe_file(f"{BUCKET}/{key}", data)
        fs.info(f"{BUCKET}/{key}", refresh=True)
        return fs.cat_file(f"{BUCKET}/{key}")

    return put, get, small


def obstore_client(endpoint: str, chunk_size: int = 5 << 20):  # noqa: ANN201
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=endpoint, access_key_id=KEY_ID, secret_access_key=SECRET,
                    region="us-east-1", client_options={"allow_http": True})

    def put(key: str, path: Path) -> None:
        obstore.put(store, key, path, chunk_size=chunk_size)

    def get(key: str, path: Path) -> None:
        result = obstore.get(store, key)
        with open(path, "wb") as handle:
            for chunk in result:
                handle.write(chunk)

    def small(key: str, data: bytes) -> bytes:
        obstore.put(store, key, data)
        obstore.head(store, key)
        return bytes(obstore.get(store, key).bytes())

    return put, get, small


CLIENTS = {"boto3": boto3_client, "s3fs": s3fs_client, "obstore": obstore_client,
           # boto3's upload_file parts are 8 MiB (obstore's default 5 MiB)
           "obstore_8MiB_parts": lambda endpoint: obstore_client(endpoint, 8 << 20)}


def timed(function, *args) -> float:  # noqa: ANN001
    start = time.perf_counter()
    function(*args)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    process, endpoint = start_moto()
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID,
                     aws_secret_access_key=SECRET, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        results: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as scratch:
            files = {}
            for label, size in (("1MB", 1 << 20), ("50MB", 50 << 20)):
                files[label] = Path(scratch, label)
                files[label].write_bytes(os.urandom(size))
            for name, make in CLIENTS.items():
                put, get, small = make(endpoint)
                small("warmup", b"x")  # connection set-up is not what we compare
                figures: dict[str, list[float]] = {}
                for repeat in range(args.repeat):
                    for label, path in files.items():
                        key = f"{name}/{label}/{repeat}"
                        figures.setdefault(f"put_{label}", []).append(timed(put, key, path))
                        target = Path(scratch, f"out-{name}-{label}")
                        figures.setdefault(f"get_{label}", []).append(timed(get, key, target))
                        assert target.read_bytes() == path.read_bytes()
                        target.unlink()
                    for _ in range(10):
                        figures.setdefault("small_round_trip", []).append(
                            timed(small, f"{name}/small", b"m" * 200))
                results[name] = {metric: {"median_ms": round(statistics.median(values), 1),
                                          "min_ms": round(min(values), 1),
                                          "max_ms": round(max(values), 1), "n": len(values)}
                                 for metric, values in figures.items()}
        print(json.dumps({"machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                      "python": platform.python_version()},
                          "repeat": args.repeat, "results": results}, indent=2))
    finally:
        process.kill()
        process.wait()


if __name__ == "__main__":
    main()
