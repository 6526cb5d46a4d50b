"""The first ``make run`` on a fresh clone: seconds from ``make run`` to the first answer of
``/healthz``, with the Makefile of two commits (``--before``, ``--after``), and the packages
each venv holds (what the ``after`` venv no longer installs).

Each run clones this repository (its committed HEAD) into a fresh folder, checks out the
commit under test, and runs ``make run`` there with a fresh ``.venv`` and a free port; the
same pip configuration serves both (this machine's: local wheel folders and indexes), with
``PIP_NO_CACHE_DIR=1`` so neither run reuses wheels the other one built. The runs alternate
(before, after, before, after, ...) so that a change of the machine's load falls on both.

    python benchmarks/first_start.py --before 7a376b2 --after HEAD --rounds 1 \\
        --out benchmarks/results/first_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 3600.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_start(commit: str, work: Path) -> dict:
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "checkout", "--quiet", commit], check=True)
    port = free_port()
    env = {**os.environ, "METASERVE_PORT": str(port), "PIP_NO_CACHE_DIR": "1"}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(part for part in env["PATH"].split(os.pathsep)
                                  if ".venv" not in part)
    log_path = work.parent / f"{work.name}.log"
    load_before = os.getloadavg()
    began = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(["make", "run"], cwd=work, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() - began > TIMEOUT_S:
                raise SystemExit(f"make run did not serve ({commit}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        seconds = time.monotonic() - began
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    frozen = subprocess.run([str(work / ".venv" / "bin" / "pip"), "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.split()
    packages = sorted(line.split("==")[0].lower() for line in frozen)
    return {"commit": commit, "seconds_to_healthz": round(seconds, 1),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "packages": packages, "venv_bytes": _size(work / ".venv")}


def _size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()
               and not file.is_symlink())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="commit with the old Makefile")
    parser.add_argument("--after", default="HEAD", help="commit with the new Makefile")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/first_start.json")
    args = parser.parse_args()
    resolve = lambda rev: subprocess.run(["git", "-C", str(REPO), "rev-parse", rev],  # noqa: E731
                                         capture_output=True, text=True, check=True).stdout.strip()
    commits = {"before": resolve(args.before), "after": resolve(args.after)}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="first-start-") as scratch:
        for round_ in range(args.rounds):
            for side in ("before", "after"):
                run = first_start(commits[side], Path(scratch) / f"{side}-{round_}")
                print(side, run["seconds_to_healthz"], "s", run["load_before"], flush=True)
                runs[side].append(run)
    before = set(runs["before"][-1]["packages"])
    after = set(runs["after"][-1]["packages"])
    summary = {side: {"seconds": [run["seconds_to_healthz"] for run in found],
                      "mean_s": round(statistics.mean(run["seconds_to_healthz"] for run in found), 1),
                      "packages": len(found[-1]["packages"]),
                      "venv_mb": round(found[-1]["venv_bytes"] / 2**20)}
               for side, found in runs.items()}
    result = {
        "what": "first `make run` on a fresh clone: seconds until /healthz answers",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "conditions": "same machine, alternating runs; pip from this machine's local wheel "
                      "folders and indexes (no network), PIP_NO_CACHE_DIR=1 for both",
        "machine": {"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": os.cpu_count()},
        "commits": commits, "summary": summary,
        "no_longer_installed": sorted(before - after),
        "newly_installed": sorted(after - before),
        "runs": {side: [{key: value for key, value in run.items() if key != "packages"}
                        for run in found] for side, found in runs.items()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
