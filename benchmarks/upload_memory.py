"""Upload memory and speed: a ~200 MB .npz streamed to a real ``metaserve serve`` (SQLite,
dispatcher off, local artifact store), the server's resident memory sampled every 20 ms.

    .venv/bin/python benchmarks/upload_memory.py [--megabytes 200] [--repeats 3]

Prints and writes benchmarks/results/upload_memory.json: per repeat the server's resident set
before the upload, its peak during it (VmHWM, reset per repeat by a fresh server), the growth,
and the upload's wall time (stream + conversion + store) and rate. The claim checked: growth
< 64 MiB (the body is streamed to disk and converted member by member, never held whole)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def make_npz(path: Path, megabytes: int) -> None:
    """uint8 images [N, 32, 32] and int64 labels, ``megabytes`` MB of pixels, written
    uncompressed (np.savez) in chunks so this script itself stays small."""
    count = megabytes * 10**6 // (32 * 32)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, 32, 32), dtype=np.uint8)
    labels = (np.arange(count) % 1000).astype(np.int64)
    np.savez(path, images=images, labels=labels)


def run_once(workdir: Path, upload: Path) -> dict:
    port = free_port()
    env = {**os.environ, "METASERVE_PORT": str(port), "METASERVE_DISPATCHER": "false"}
    env.pop("METASERVE_DATABASE_URL", None)
    executable = str(Path(sys.executable).with_name("metaserve"))
    log = (workdir / "server.log").open("a")
    server = subprocess.Popen([executable, "serve"], cwd=workdir, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        key = (workdir / ".metaserve" / "admin.key").read_text().strip()
        time.sleep(1.0)
        before = status_kib(server.pid, "VmRSS")
        peak_sampled = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak_sampled.append(status_kib(server.pid, "VmRSS"))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        sys.path.insert(0, str(ROOT))
        from metaserve.client import Client

        with Client(url=url, api_key=key) as client:
            dataset = client.upload_dataset(upload, name="memory-benchmark")
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        peak = max(status_kib(server.pid, "VmHWM"), max(peak_sampled))
        return {"rss_before_mib": before / 1024, "rss_peak_mib": peak / 1024,
                "growth_mib": (peak - before) / 1024, "seconds": elapsed,
                "upload_bytes": upload.stat().st_size,
                "mb_per_s": upload.stat().st_size / 1e6 / elapsed,
                "images": dataset["images"], "classes": dataset["classes"]}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/upload_memory.json")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="upload-memory-"))
    try:
        upload = scratch / "big.npz"
        make_npz(upload, args.megabytes)
        runs = []
        for repeat in range(args.repeats):
            workdir = scratch / f"server{repeat}"
            workdir.mkdir()
            runs.append(run_once(workdir, upload))
            print(json.dumps(runs[-1]))
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    growth = [run["growth_mib"] for run in runs]
    result = {"command": " ".join(["benchmarks/upload_memory.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "runs": runs, "max_growth_mib": max(growth),
              "claim_growth_below_64_mib": max(growth) < 64}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
