"""Few-shot benchmark on the hard built-in family (``typefaces``): the raw-pixel
nearest-prototype floor, ProtoNets, MAML and ANIL, each on conv4 (and resnet12 with
``--backbones conv4 resnet12`` where a GPU is available), at 5-way 1-shot, 5-way 5-shot and
20-way 1-shot, over several seeds; test split.

Every method is trained by the engine itself (:class:`metaserve.workers.engine.Trainer`, what
``metaserve train`` runs) and evaluated on the same test tasks (task ``t`` of the test split is
a function of (seed, "test", 0, t): all methods of one seed see the same tasks, and the pixel
floor is computed on exactly those). Reported per run: test accuracy mean ± 95 % CI over test
tasks — non-transductive (each query image classified alone, as the served predictor does)
and, for batch norm, the transductive number of MAML's paper — the training time and the
hardware. The table gives, per cell, the mean over seeds of the per-seed means, the mean CI
half-width over test tasks, and the spread over seeds (min-max).

    # the full table (many CPU-hours; a GPU: add --device cuda)
    .venv/bin/python benchmarks/fewshot.py --seeds 0 1 2
    # a smoke run (seconds)
    .venv/bin/python benchmarks/fewshot.py --iterations 3 --tasks 20 --seeds 0 \\
        --settings 5w1s --out benchmarks/results/fewshot-smoke

Raw JSON: one file per (setting, method, backbone, seed) and ``summary.json`` under ``--out``
(default benchmarks/results/fewshot); the Markdown table is printed and written as table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1)}
METHODS = ("pixels", "protonet", "maml", "anil")
QUERY_SHOTS = 15
Z_95 = 1.959963984540054


def algorithm_spec(method: str, ways: int) -> tuple[dict, list[int]]:
    """The algorithm and the evaluation's inner steps: MAML's Omniglot settings (Finn et al.
    2017: α = 0.4, one step in training, three at test for 5-way; α = 0.1, five steps, 20-way)."""
    if method == "protonet":
        return {"name": "protonet"}, [0]
    five_way = ways == 5
    return ({"name": method, "inner_lr": 0.4 if five_way else 0.1,
             "inner_steps": 1 if five_way else 5}, [1, 3] if five_way else [5])


def job_spec(method: str, setting: str, backbone: str, seed: int, args: argparse.Namespace) -> dict:
    ways, shots = SETTINGS[setting]
    algorithm, steps = algorithm_spec(method, ways)
    model = ({"name": "conv4", "filters": 64, "norm": "batch"} if backbone == "conv4" else
             {"name": "resnet12", "widths": args.resnet_widths, "norm": "batch"})
    return {"name": f"fewshot-{setting}-{method}-{backbone}-seed{seed}", "algorithm": algorithm,
            "task_family": {"name": "typefaces", "ways": ways, "support_shots": shots,
                            "query_shots": QUERY_SHOTS},
            "model": model, "meta_batch_size": args.meta_batch_size, "iterations": args.iterations,
            "outer_optimizer": {"name": "adam", "lr": 0.001},
            "evaluation": {"every": 0, "tasks": args.tasks, "inner_steps": steps},
            "resources": {"task_chunk": args.task_chunk} if args.task_chunk else {},
            "checkpoint_every": args.iterations, "log_every": max(1, args.iterations // 10),
            "seed": seed}


def mean_ci(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return float(values.mean()), Z_95 * float(values.std()) / len(values) ** 0.5


def pixel_floor(setting: str, seed: int, tasks: int) -> dict:
    """Nearest class mean of raw pixels on the test tasks every method of ``seed`` sees."""
    from metaserve.workers.spec import TypefacesSpec
    from metaserve.workers.tasks import build_task_family

    ways, shots = SETTINGS[setting]
    family = build_task_family(TypefacesSpec(ways=ways, support_shots=shots, query_shots=QUERY_SHOTS))
    hits = []
    for start in range(0, tasks, 200):
        support_x, support_y, query_x, query_y = family.sample(
            seed=seed, split="test", iteration=0, task_indices=range(start, min(tasks, start + 200)))
        one_hot = F.one_hot(support_y, ways).float()
        prototypes = one_hot.transpose(1, 2) @ support_x.flatten(2) / one_hot.sum(1)[..., None]
        guesses = torch.cdist(query_x.flatten(2), prototypes).argmin(-1)
        hits.append((guesses == query_y).float().mean(1))
    accuracy, ci = mean_ci(torch.cat(hits))
    return {"accuracy": accuracy, "ci95": ci, "transductive_accuracy": None, "train_seconds": 0.0}


def train_and_test(spec: dict, device: str) -> dict:
    from metaserve.workers.engine import Trainer

    trainer = Trainer(spec, device=device)
    state = trainer.init_state()
    started = time.perf_counter()
    for _ in range(spec["iterations"]):
        state, _ = trainer.step(state)
    seconds = time.perf_counter() - started
    result = trainer.evaluate(state.params, split="test")
    step = max(spec["evaluation"]["inner_steps"])
    return {"accuracy": result[f"test/accuracy_step{step}"],
            "ci95": result[f"test/accuracy_step{step}_ci95"],
            "transductive_accuracy": result.get(f"test/transductive_accuracy_step{step}"),
            "transductive_ci95": result.get(f"test/transductive_accuracy_step{step}_ci95"),
            "inner_steps_at_test": step, "train_seconds": seconds, "evaluation": result}


def hardware(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (GPU), {os.cpu_count()} CPUs"
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} on {torch.get_num_threads()} threads"


def table(rows: list[dict], backbones: list[str]) -> str:
    lines = ["| setting | method | backbone | accuracy (non-transductive) | transductive | "
             "spread over seeds | seeds | train s/seed |", "|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        for method in METHODS:
            for backbone in (backbones if method != "pixels" else ["-"]):
                runs = [r for r in rows if (r["setting"], r["method"], r["backbone"]) ==
                        (setting, method, backbone)]
                if not runs:
                    continue
                accuracy = [100 * r["accuracy"] for r in runs]
                ci = statistics.mean(100 * r["ci95"] for r in runs)
                trans = [100 * r["transductive_accuracy"] for r in runs
                         if r.get("transductive_accuracy") is not None]
                lines.append(
                    f"| {setting} | {method} | {backbone} | {statistics.mean(accuracy):.1f} ± {ci:.1f} | "
                    + (f"{statistics.mean(trans):.1f}" if trans else "-")
                    + f" | {min(accuracy):.1f}-{max(accuracy):.1f} | {len(runs)} | "
                    f"{statistics.mean(r['train_seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--backbones", nargs="+", default=["conv4"], choices=["conv4", "resnet12"])
    parser.add_argument("--resnet-widths", nargs=4, type=int, default=[64, 160, 320, 640])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--task-chunk", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=1000, help="Test tasks per run.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fewshot")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for setting in args.settings:
        for seed in args.seeds:
            for method in args.methods:
                for backbone in (args.backbones if method != "pixels" else ["-"]):
                    started = time.perf_counter()
                    if method == "pixels":
                        result, spec = pixel_floor(setting, seed, args.tasks), None
                    else:
                        spec = job_spec(method, setting, backbone, seed, args)
                        result = train_and_test(spec, args.device)
                    row = {"setting": setting, "method": method, "backbone": backbone, "seed": seed,
                           **{k: v for k, v in result.items() if k != "evaluation"},
                           "wall_seconds": time.perf_counter() - started,
                           "hardware": hardware(args.device), "spec": spec,
                           "evaluation": result.get("evaluation")}
                    rows.append(row)
                    name = f"{setting}-{method}-{backbone}-seed{seed}.json"
                    (args.out / name).write_text(json.dumps(row, indent=2))
                    print(f"{setting} {method} {backbone} seed {seed}: "
                          f"{100 * row['accuracy']:.1f} ± {100 * row['ci95']:.1f}", file=sys.stderr)
    markdown = table(rows, args.backbones)
    summary = {"command": "benchmarks/fewshot.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "hardware": hardware(args.device), "test_tasks": args.tasks,
               "query_shots": QUERY_SHOTS, "rows": [{k: v for k, v in r.items() if k != "evaluation"}
                                                    for r in rows]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "table.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
