"""Fetch a finished meta-RL job's meta-policy from a metaserve server and run it on fresh tasks.

    python examples/eval_meta_policy.py --url http://127.0.0.1:8000 --key $KEY --job JOB_ID
    python examples/eval_meta_policy.py --directory path/with/meta_policy_files

MAML adapts with its recorded policy-gradient steps, RL² with its recurrent state over a
trial, PEARL by posterior sampling of its task variable.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx

from metaserve.workers.rl import META_POLICY_JSON, META_POLICY_TENSORS, load_meta_policy


def download(url: str, key: str, job_id: str, directory: Path) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        for name in (META_POLICY_TENSORS, META_POLICY_JSON):
            response = client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
            response.raise_for_status()
            (directory / name).write_bytes(response.content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--key")
    parser.add_argument("--job")
    parser.add_argument("--directory", type=Path)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.directory
        if directory is None:
            if not (args.url and args.key and args.job):
                parser.error("give --directory, or --url, --key and --job")
            directory = Path(scratch)
            download(args.url, args.key, args.job, directory)
        policy = load_meta_policy(directory)
        tasks = policy.sample_tasks(args.tasks, seed=args.seed)
        print(json.dumps({"algorithm": policy.algorithm, "task_family": policy.family.name,
                          "tasks": args.tasks, **policy.evaluate(tasks, seed=args.seed)}, indent=2))


if __name__ == "__main__":
    main()
