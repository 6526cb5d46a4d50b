"""MAML-RL on nav2d (Finn et al. 2017, §5.3): average return before adaptation and after 1 and 3
policy-gradient steps, against the paper's −40.41 → −11.68 → −3.23, with the environment
steps and wall time it took; also the env steps at which the 1-step return first reached −15.

    nice -n 19 .venv/bin/python benchmarks/rl_maml_nav2d.py --iterations 150 --minutes 30

The spec is ``examples/maml_nav2d.yaml`` unless ``--spec`` says otherwise (another continuous
family, e.g. ``examples/maml_halfcheetah_vel.yaml``, runs the same way, without the nav2d
paper figures and target); flags override the outer step, inner lr/steps, meta-batch size,
episodes per task, max KL, action normalization and seed. The validation curve (``curve``: ``iteration``, ``env_steps``, ``seconds``, ``val/return_step{0,1,3}``
with ``_ci95``) is on 40 validation goals; the final figures on 200 test goals.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from metaserve.workers.rl.maml_rl import MAMLRL
from metaserve.workers.spec import JobSpec

PAPER = {"return_step0": -40.41, "return_step1": -11.68, "return_step3": -3.23}
TARGET = -15.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, default=Path("examples/maml_nav2d.yaml"),
                        help="the job spec (YAML); the flags below override parts of it")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-tasks", type=int, default=40)
    parser.add_argument("--final-tasks", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--outer", choices=["trpo", "ppo"], default=None)
    parser.add_argument("--inner-lr", type=float, default=None)
    parser.add_argument("--inner-steps", type=int, default=None)
    parser.add_argument("--meta-batch", type=int, default=None)
    parser.add_argument("--episodes", type=int, default=None, help="trajectories per task")
    parser.add_argument("--max-kl", type=float, default=None)
    parser.add_argument("--later-inner-lr", type=float, default=None)
    parser.add_argument("--save", type=Path, default=None,
                        help="torch.save the final and best-validation parameters here")
    parser.add_argument("--normalize-actions", choices=["true", "false"], default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rl_maml_nav2d.json"))
    parser.add_argument("--stop-at", type=float, default=None,
                        help="stop once the 1-step validation return reaches this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    document = yaml.safe_load(args.spec.read_text())
    algorithm, pg = document["algorithm"], document["algorithm"].setdefault("policy_gradient", {})
    for value, target, key in ((args.outer, pg, "outer"), (args.max_kl, pg, "max_kl"),
                               (args.later_inner_lr, pg, "later_inner_lr"),
                               (args.inner_lr, algorithm, "inner_lr"),
                               (args.inner_steps, algorithm, "inner_steps"),
                               (args.meta_batch, document, "meta_batch_size"),
                               (args.episodes, pg, "episodes_per_task"),
                               (args.seed, document, "seed")):
        if value is not None:
            target[key] = value
    if args.normalize_actions is not None:
        pg["normalize_actions"] = args.normalize_actions == "true"
    document["iterations"] = args.iterations
    spec = JobSpec.model_validate(document)
    maml = MAMLRL(spec)
    curve, reached_at, best = [], None, None
    started = time.monotonic()
    while maml.iteration < args.iterations and time.monotonic() - started < args.minutes * 60:
        train = maml.train_iteration() if curve else {}  # the first point: before training
        if maml.iteration % args.eval_every == 0:
            evaluation = maml.evaluate("val", tasks=args.eval_tasks, inner_steps=[1, 3])
            point = {"iteration": maml.iteration, "env_steps": maml.env_steps,
                     "seconds": round(time.monotonic() - started, 1), **train, **evaluation}
            curve.append(point)
            print(json.dumps(point), flush=True)
            if best is None or evaluation["val/return_step1"] > best["val/return_step1"]:
                best = {"iteration": maml.iteration, "env_steps": maml.env_steps,
                        "val/return_step1": evaluation["val/return_step1"],
                        "params": {k: v.detach().clone() for k, v in maml.params.items()}}
            if reached_at is None and evaluation["val/return_step1"] >= TARGET:
                reached_at = {"iteration": maml.iteration, "env_steps": maml.env_steps}
            if args.stop_at is not None and evaluation["val/return_step1"] >= args.stop_at:
                break
    seconds = time.monotonic() - started
    final = maml.evaluate("test", tasks=args.final_tasks, inner_steps=[1, 3])
    if args.save is not None:
        torch.save({"final": {k: v.detach().clone() for k, v in maml.params.items()},
                    "best_val": best and best["params"], "spec": spec.model_dump(mode="json")},
                   args.save)
    best_val = None
    if best is not None:  # the iterate with the best 1-step validation return (early stopping)
        params = best.pop("params")
        if best["iteration"] == maml.iteration:
            best_val = {**best, "test": final}
        else:
            with torch.no_grad():
                for name, value in maml.params.items():
                    value.copy_(params[name])
            best_val = {**best, "test": maml.evaluate("test", tasks=args.final_tasks,
                                                      inner_steps=[1, 3])}
    result = {"spec": spec.model_dump(mode="json"), "iterations": maml.iteration,
              "env_steps": maml.env_steps, "train_seconds": round(seconds, 1),
              "test": final, "best_val": best_val, "curve": curve,
              "torch_threads": args.threads}
    if spec.task_family.name == "nav2d":  # the paper's figures and the −15 target are nav2d's
        result.update(paper=PAPER, reached_minus_15=reached_at)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"test": final, "best_val": best_val, "train_seconds": seconds,
                      "reached": reached_at}))


if __name__ == "__main__":
    main()
