"""Sine accuracy against the MAML paper (Finn et al. 2017, §5.1, 1 inner step at α = 0.01).

Trains examples/sine_{maml,metasgd,prompt}.yaml in-process (torch threads = 1) with each of
``--seeds`` (the spec's ``seed``: initialization, training tasks and the held-out test tasks)
and evaluates the post-1-step query MSE on 1,000 held-out test tasks with 10 and 5 support
shots, mean and 95 % CI; ``summary`` gives, per algorithm, the mean over seeds and their
spread (min, max). Targets for MAML: ≤ 0.40 (10 shots), ≤ 0.65 (5 shots), training ≤ 4 minutes.

    python benchmarks/engine_sine_accuracy.py --seeds 0 1 2 \
        --json benchmarks/results/engine_sine_accuracy.json   # 9 runs of 2.5-8 min on one core
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from metaserve.workers.cli import load_spec
from metaserve.workers.engine import Trainer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HELD_OUT_TASKS = 1000


def run(algorithm: str, seed: int) -> dict:
    spec = load_spec(EXAMPLES / f"sine_{algorithm}.yaml", ["evaluation.every=0", f"seed={seed}"])
    trainer = Trainer(spec)
    with tempfile.TemporaryDirectory() as out:
        state = trainer.init_state()
        started = time.perf_counter()
        while state.iteration < spec.iterations:
            state, _ = trainer.step(state)
        train_seconds = time.perf_counter() - started
    result = {"algorithm": algorithm, "seed": seed, "iterations": spec.iterations,
              "train_seconds": round(train_seconds, 1)}
    for shots in (10, 5):
        metrics = trainer.evaluate(state.params, split="test", tasks=HELD_OUT_TASKS, support_shots=shots)
        result[f"mse_step1_{shots}shot"] = round(metrics["test/loss_step1"], 4)
        result[f"mse_step1_{shots}shot_ci95"] = round(metrics["test/loss_step1_ci95"], 4)
        result[f"mse_step0_{shots}shot"] = round(metrics["test/loss_step0"], 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["maml", "metasgd", "prompt"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for algorithm in args.algorithms:
        for seed in args.seeds:
            results.append(run(algorithm, seed))
            print(json.dumps(results[-1]), flush=True)
    summary = {}
    for algorithm in args.algorithms:
        runs = [result for result in results if result["algorithm"] == algorithm]
        summary[algorithm] = {"seeds": [run_["seed"] for run_ in runs]}
        for key in ("mse_step1_10shot", "mse_step1_5shot", "train_seconds"):
            values = [run_[key] for run_ in runs]
            summary[algorithm][key] = {"mean": round(sum(values) / len(values), 4),
                                       "min": min(values), "max": max(values)}
    print(json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                         "cpus": os.cpu_count(), "torch": torch.__version__,
                                         "summary": summary, "results": results}, indent=2))


if __name__ == "__main__":
    main()
