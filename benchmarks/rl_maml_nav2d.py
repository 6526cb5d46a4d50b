"""MAML-RL on nav2d (Finn et al. 2017, §5.3): average return before adaptation and after 1 and 3
policy-gradient steps, against the paper's −40.41 → −11.68 → −3.23, with the environment
steps and wall time it took; also the env steps at which the 1-step return first reached −15.

    .venv/bin/python benchmarks/rl_maml_nav2d.py --iterations 150 --minutes 25
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workers.rl.maml_rl import MAMLRL
from workers.spec import JobSpec

PAPER = {"return_step0": -40.41, "return_step1": -11.68, "return_step3": -3.23}
TARGET = -15.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-tasks", type=int, default=40)
    parser.add_argument("--final-tasks", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rl_maml_nav2d.json"))
    parser.add_argument("--stop-at", type=float, default=None,
                        help="stop once the 1-step validation return reaches this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = JobSpec.model_validate({
        "algorithm": {"name": "maml", "inner_lr": 0.1, "inner_steps": 1,
                      "policy_gradient": {"episodes_per_task": 20, "outer_epochs": 5}},
        "task_family": {"name": "nav2d"}, "meta_batch_size": 20, "iterations": args.iterations,
        "outer_optimizer": {"name": "adam", "lr": 0.001}, "seed": 0})
    maml = MAMLRL(spec)
    curve, reached_at = [], None
    started = time.monotonic()
    while maml.iteration < args.iterations and time.monotonic() - started < args.minutes * 60:
        train = maml.train_iteration()
        if maml.iteration % args.eval_every == 0:
            evaluation = maml.evaluate("val", tasks=args.eval_tasks, inner_steps=[1, 3])
            point = {"iteration": maml.iteration, "env_steps": maml.env_steps,
                     "seconds": round(time.monotonic() - started, 1), **train, **evaluation}
            curve.append(point)
            print(json.dumps(point), flush=True)
            if reached_at is None and evaluation["val/return_step1"] >= TARGET:
                reached_at = {"iteration": maml.iteration, "env_steps": maml.env_steps}
            if args.stop_at is not None and evaluation["val/return_step1"] >= args.stop_at:
                break
    seconds = time.monotonic() - started
    final = maml.evaluate("test", tasks=args.final_tasks, inner_steps=[1, 3])
    result = {"spec": spec.model_dump(mode="json"), "iterations": maml.iteration,
              "env_steps": maml.env_steps, "train_seconds": round(seconds, 1),
              "test": final, "paper": PAPER, "reached_minus_15": reached_at, "curve": curve,
              "torch_threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"test": final, "train_seconds": seconds, "reached": reached_at}))


if __name__ == "__main__":
    main()
