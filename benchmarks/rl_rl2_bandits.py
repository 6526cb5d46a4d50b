"""RL² on Bernoulli bandits (Duan et al. 2016, Table 1) against random, UCB1 (c = √2 and c tuned
on training tasks) and Thompson sampling measured on the same held-out tasks, with the
training time. Paper: (n=10, k=5) 6.7; (n=10, k=10) 6.7; (n=100, k=5) 78.7.

    .venv/bin/python benchmarks/rl_rl2_bandits.py --pulls 10 --arms 5 --minutes 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray

PAPER = {(10, 5): 6.7, (10, 10): 6.7, (100, 5): 78.7}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pulls", type=int, default=10)
    parser.add_argument("--arms", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--trials", type=int, default=256, help="trials per iteration")
    parser.add_argument("--envs", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--eval-trials", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from workers.rl.rl2 import RL2Trainer
    from workers.spec import JobSpec

    spec = JobSpec.model_validate({
        "algorithm": {"name": "rl2", "hidden_size": args.hidden, "lr": args.lr,
                      "envs_per_runner": args.envs, "evaluation_trials": args.eval_trials,
                      "minibatch_trials": 64, "num_epochs": 4, "gae_lambda": 0.3, "gamma": 0.99},
        "task_family": {"name": "bandit", "arms": args.arms, "pulls": args.pulls},
        "meta_batch_size": args.trials, "iterations": args.iterations, "seed": 0})
    trainer = RL2Trainer(spec)
    curve = []
    started = time.monotonic()
    while trainer.iteration < args.iterations and time.monotonic() - started < args.minutes * 60:
        metrics = trainer.train_iteration()
        if trainer.iteration % 10 == 0:
            point = {"iteration": trainer.iteration, "seconds": round(time.monotonic() - started, 1),
                     **metrics}
            curve.append(point)
            print(json.dumps(point), flush=True)
    seconds = time.monotonic() - started
    evaluation = trainer.evaluate("test")
    result = {"pulls": args.pulls, "arms": args.arms, "paper_rl2": PAPER.get((args.pulls, args.arms)),
              "iterations": trainer.iteration, "env_steps": trainer.env_steps,
              "train_seconds": round(seconds, 1), "test": evaluation,
              "spec": spec.model_dump(mode="json"), "curve": curve}
    out = args.out or Path(f"benchmarks/results/rl_rl2_bandit_n{args.pulls}_k{args.arms}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "spec")}))
    trainer.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
