"""PEARL on nav2d (Rakelly et al. 2019) against MAML-RL at equal environment steps: the adapted
return (second episode on a held-out task, z sampled from the posterior on the first) over
training, the environment steps at which it first reached −15, and MAML's 1-step return at
the same number of environment steps (read from benchmarks/results/rl_maml_nav2d.json).

    .venv/bin/python benchmarks/rl_pearl_nav2d.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray
import torch

TARGET = -15.0


def maml_return_at(steps: int, maml: dict) -> dict | None:
    """MAML's 1-step return at the last evaluation with at most ``steps`` env steps."""
    before = [p for p in maml.get("curve", []) if p["env_steps"] <= steps]
    if not before:
        return {"env_steps": 0, "val/return_step1": None,
                "note": f"MAML's first evaluation is at {maml['curve'][0]['env_steps']} env steps"}
    point = before[-1]
    return {"env_steps": point["env_steps"], "val/return_step1": point["val/return_step1"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-tasks", type=int, default=50)
    parser.add_argument("--final-tasks", type=int, default=200)
    parser.add_argument("--maml", type=Path, default=Path("benchmarks/results/rl_maml_nav2d.json"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rl_pearl_nav2d.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from workers.rl.pearl import PEARL
    from workers.spec import JobSpec

    spec = JobSpec.model_validate({"algorithm": {"name": "pearl"}, "task_family": {"name": "nav2d"},
                                   "meta_batch_size": 16, "seed": 0})
    pearl = PEARL(spec)
    curve, reached = [], None
    started = time.monotonic()
    while pearl.iteration < args.iterations and time.monotonic() - started < args.minutes * 60:
        train = pearl.train_iteration()
        if pearl.iteration % args.eval_every == 0:
            evaluation = pearl.evaluate("val", tasks=args.eval_tasks)
            point = {"iteration": pearl.iteration, "env_steps": pearl.env_steps,
                     "seconds": round(time.monotonic() - started, 1), **train, **evaluation}
            curve.append(point)
            print(json.dumps(point), flush=True)
            if reached is None and evaluation["val/adapted_return"] >= TARGET:
                reached = {"iteration": pearl.iteration, "env_steps": pearl.env_steps}
    seconds = time.monotonic() - started
    final = pearl.evaluate("test", tasks=args.final_tasks)
    maml = json.loads(args.maml.read_text()) if args.maml.exists() else None
    result = {"iterations": pearl.iteration, "env_steps": pearl.env_steps,
              "train_seconds": round(seconds, 1), "test": final, "reached_minus_15": reached,
              "maml_at_equal_env_steps": maml_return_at(pearl.env_steps, maml) if maml else None,
              "maml_reached_minus_15": maml.get("reached_minus_15") if maml else None,
              "spec": spec.model_dump(mode="json"), "curve": curve}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "spec")}))
    pearl.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
