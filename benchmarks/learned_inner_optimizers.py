"""MAML vs MAML++ vs Meta-Curvature on sine at the same budget (docs/notes/learned-inner-optimizers.md).

Each algorithm trains from examples/sine_{mamlpp,metacurvature}.yaml's recipe (MAML: the same
recipe with ``algorithm: maml``): 3 inner steps at α = 0.01 (MAML++: the learned rates start
there), meta-batch 25, Adam 1e-3, ``--iterations`` meta-iterations (the same for all; MAML++'s
multi-step loss annealed over the first half), in-process with torch threads = 1, ``--seeds``
each (the spec's seed: initialization, training tasks, held-out tasks). Then the query MSE on
1,000 held-out *test* tasks (10 support shots) after 0, 1, 3 and 10 inner steps: per run the
mean and 95 % CI over tasks; per algorithm the mean over seeds ± the 95 % t-interval of the
seed means. Wall seconds are of a shared, loaded machine (its load average is recorded).

    python benchmarks/learned_inner_optimizers.py --seeds 0 1 2 --iterations 1000 \
        --json benchmarks/results/learned_inner_optimizers.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HELD_OUT_TASKS = 1000
STEPS = (0, 1, 3, 10)
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def run(algorithm: str, seed: int, iterations: int) -> dict:
    import torch

    from metaserve.workers.cli import load_spec
    from metaserve.workers.engine import Trainer

    torch.set_num_threads(1)
    example = "metacurvature" if algorithm == "metacurvature" else "mamlpp"
    overrides = ["evaluation.every=0", f"seed={seed}", f"iterations={iterations}",
                 f"evaluation.inner_steps=[{', '.join(str(s) for s in STEPS if s)}]"]
    if algorithm == "mamlpp":
        overrides.append(f"algorithm.multi_step_loss_iterations={iterations // 2}")
    spec = load_spec(EXAMPLES / f"sine_{example}.yaml", overrides)
    if algorithm == "maml":
        spec = spec.model_copy(update={"algorithm": type(spec).model_validate(
            {**spec.model_dump(mode="json"), "algorithm": {"name": "maml", "inner_lr": 0.01,
                                                           "inner_steps": 3}}).algorithm})
    trainer = Trainer(spec)
    state = trainer.init_state()
    started = time.perf_counter()
    while state.iteration < spec.iterations:
        state, _ = trainer.step(state)
    train_seconds = time.perf_counter() - started
    metrics = trainer.evaluate(state.params, split="test", tasks=HELD_OUT_TASKS, support_shots=10)
    result = {"algorithm": algorithm, "seed": seed, "iterations": iterations,
              "spec_algorithm": spec.algorithm.model_dump(mode="json"),
              "train_seconds": round(train_seconds, 1)}
    for step in STEPS:
        result[f"mse_step{step}"] = metrics[f"test/loss_step{step}"]
        result[f"mse_step{step}_ci95"] = metrics[f"test/loss_step{step}_ci95"]
    if algorithm == "mamlpp":
        result["learned_lrs"] = {name[len("lslr."):]: [round(float(v), 5) for v in value]
                                 for name, value in state.params.items() if name.startswith("lslr.")}
    return result


def summary(runs: list[dict]) -> dict:
    out = {}
    for algorithm in sorted({r["algorithm"] for r in runs}):
        mine = [r for r in runs if r["algorithm"] == algorithm]
        row = {"seeds": [r["seed"] for r in mine]}
        for step in STEPS:
            values = [float(r[f"mse_step{step}"]) for r in mine]
            mean = sum(values) / len(values)
            half = None
            if len(values) > 1 and all(math.isfinite(v) for v in values):
                spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                half = T_95.get(len(values) - 1, 1.96) * spread / math.sqrt(len(values))
            row[f"mse_step{step}"] = {"mean": round(mean, 4), "ci95": None if half is None else round(half, 4),
                                      "per_seed": [round(v, 4) for v in values]}
        row["train_seconds_mean"] = round(sum(r["train_seconds"] for r in mine) / len(mine), 1)
        out[algorithm] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=["maml", "mamlpp", "metacurvature"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = time.perf_counter()
    jobs = [(a, s, args.iterations) for s in args.seeds for a in args.algorithms]
    runs = []
    with ProcessPoolExecutor(args.processes) as pool:
        for result in pool.map(run, *zip(*jobs)):
            runs.append(result)
            print(json.dumps(result), flush=True)  # each run as it ends, before any summary
    document = {
        "benchmark": "learned_inner_optimizers",
        "command": "python benchmarks/learned_inner_optimizers.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
            if v is not None),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads_per_run": 1, "processes": args.processes},
        "load_average_before": [round(v, 1) for v in load_before],
        "load_average_after": [round(v, 1) for v in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "held_out_tasks": HELD_OUT_TASKS, "support_shots": 10, "split": "test",
        "runs": runs, "summary": summary(runs),
    }
    text = json.dumps(document, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(json.dumps(document["summary"], indent=2))


if __name__ == "__main__":
    main()
