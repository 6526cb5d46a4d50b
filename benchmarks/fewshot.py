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
The table and summary cover every run JSON in ``--out``, so a table can be built by several
invocations (e.g. different ``--iterations`` per setting); ``--skip-done`` keeps finished runs,
so a crashed or stopped benchmark restarts where it was. ``--train-query-shots`` trains on fewer
queries per class than the test tasks have (ProtoNets' Omniglot recipe trains on 5); the test
tasks always have 15, the same tasks as the pixel floor's.
"""

from __future__ import annotations

import argparse
import json
import os
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


def job_spec(method: str, setting: str, backbone: str, seed: int, args: argparse.Namespace,
             query_shots: int = QUERY_SHOTS) -> dict:
    ways, shots = SETTINGS[setting]
    algorithm, steps = algorithm_spec(method, ways)
    model = ({"name": "conv4", "filters": 64, "norm": args.norm} if backbone == "conv4" else
             {"name": "resnet12", "widths": args.resnet_widths, "norm": args.norm})
    return {"name": f"fewshot-{setting}-{method}-{backbone}-seed{seed}", "algorithm": algorithm,
            "task_family": {"name": "typefaces", "ways": ways, "support_shots": shots,
                            "query_shots": query_shots},
            "model": model, "meta_batch_size": args.meta_batch_size, "iterations": args.iterations,
            "outer_optimizer": {"name": "adam", "lr": 0.001},
            "evaluation": {"every": 0, "tasks": args.tasks, "inner_steps": steps},
            "resources": {"task_chunk": args.task_chunk} if args.task_chunk else {},
            "checkpoint_every": args.iterations, "log_every": max(1, args.iterations // 10),
            "seed": seed}


def mean_ci(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return float(values.mean()), Z_95 * float(values.std()) / len(values) ** 0.5


def pixel_floor_tasks(setting: str, seed: int, tasks: int) -> torch.Tensor:
    """Per-task accuracy of the raw-pixel nearest class mean on the test tasks every method
    of ``seed`` sees (float64)."""
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
        hits.append((guesses == query_y).double().mean(1))
    return torch.cat(hits)


def pixel_floor(setting: str, seed: int, tasks: int) -> dict:
    """Nearest class mean of raw pixels on the test tasks every method of ``seed`` sees."""
    accuracy, ci = mean_ci(pixel_floor_tasks(setting, seed, tasks))
    return {"accuracy": accuracy, "ci95": ci, "transductive_accuracy": None, "train_seconds": 0.0}


def task_curves(trainer, params: dict, steps: list[int], transductive: bool, split: str = "test",
                tasks: int | None = None) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
    """Per-task query loss and accuracy ``[T, len(steps)]`` on tasks ``0..tasks-1`` of ``split``
    (default ``spec.evaluation.tasks``), keyed by ``transductive`` (False: served, each query
    alone with the support statistics; True also when ``transductive``): the engine's sampling,
    chunks (``Trainer.evaluation_chunk``: ``task_chunk``, else the meta-batch size for images;
    500 image tasks at once took 21 GB) and ``evaluation_passes``, each chunk sampled and
    adapted once for both passes."""
    from metaserve.workers.engine.trainer import _chunks

    spec = trainer.spec
    steps = sorted(set(steps))
    modes = (False, True) if transductive else (False,)
    curves: dict[bool, list[tuple[torch.Tensor, torch.Tensor]]] = {mode: [] for mode in modes}
    for chunk in _chunks(range(tasks or spec.evaluation.tasks), trainer.evaluation_chunk):
        batch = trainer.family.sample(seed=spec.seed, split=split, iteration=0, task_indices=chunk,
                                      support_shots=spec.evaluation.support_shots).to(trainer.device)
        passes = trainer.algorithm.evaluation_passes(trainer._on_device(params), *batch, tuple(steps),
                                                     tuple(steps) if transductive else ())
        for mode, (loss, acc) in zip(modes, passes):
            curves[mode].append((loss.detach().cpu(), acc.detach().cpu()))
    return {mode: (torch.cat([loss for loss, _ in parts]), torch.cat([acc for _, acc in parts]))
            for mode, parts in curves.items()}


def test_evaluation(trainer, params: dict, steps: list[int], transductive: bool) -> dict:
    """What :meth:`Trainer.evaluate` computes on the test split (the engine's sampling, chunks,
    ``evaluation_curves`` and ``summarize``), at the inner-step counts ``steps`` only (no step 0
    unless asked), and the transductive pass only when ``transductive``."""
    from metaserve.workers.engine.evaluation import summarize

    steps = sorted(set(steps))
    result = {}
    for mode, (loss, acc) in task_curves(trainer, params, steps, transductive).items():
        both = summarize("test", steps, loss, acc)
        result.update({(name.replace("/", "/transductive_", 1) if mode else name): value
                       for name, value in both.items() if not (mode and name.endswith("/tasks"))})
    return result


def train_and_test(spec: dict, device: str, transductive: bool = True,
                   train_query_shots: int = QUERY_SHOTS, final_step_only: bool = False) -> dict:
    """Train on ``train_query_shots`` queries per class, test on the benchmark's test tasks
    (``QUERY_SHOTS`` queries per class, the tasks the pixel floor sees)."""
    from metaserve.workers.engine import Trainer

    train_spec = json.loads(json.dumps(spec))
    train_spec["task_family"]["query_shots"] = train_query_shots
    trainer = Trainer(train_spec, device=device)
    state = trainer.init_state()
    started, cpu = time.perf_counter(), time.process_time()
    accuracies = []
    for _ in range(spec["iterations"]):
        state, metrics = trainer.step(state)
        accuracies.append(metrics.get("train/accuracy_after"))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    evaluator = Trainer(spec, device=device)
    started, cpu = time.perf_counter(), time.process_time()
    step = max(spec["evaluation"]["inner_steps"])
    steps = [step] if final_step_only else [0, *spec["evaluation"]["inner_steps"]]
    result = test_evaluation(evaluator, state.params, steps,
                             transductive and evaluator.algorithm.trains_transductive)
    return {"accuracy": result[f"test/accuracy_step{step}"],
            "ci95": result[f"test/accuracy_step{step}_ci95"],
            "transductive_accuracy": result.get(f"test/transductive_accuracy_step{step}"),
            "transductive_ci95": result.get(f"test/transductive_accuracy_step{step}_ci95"),
            "inner_steps_at_test": step, "train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
            "test_seconds": time.perf_counter() - started, "test_cpu_seconds": time.process_time() - cpu,
            "train_query_shots": train_query_shots,
            "train_query_accuracy_first_last10": [statistics.mean(accuracies[:10]),
                                                  statistics.mean(accuracies[-10:])]
            if accuracies and None not in accuracies else None,
            "evaluation": result}


def engine_source() -> dict:
    """Where the engine came from: its folder and commit (``METASERVE_SOURCE_COMMIT`` for an
    exported tree), and whether its files differ from that commit."""
    import subprocess

    import metaserve.workers

    folder = Path(metaserve.workers.__file__).resolve().parent
    commit = os.environ.get("METASERVE_SOURCE_COMMIT")
    dirty = None
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], check=True,
                                    capture_output=True, text=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(folder), "diff", "--quiet", "HEAD", "--", "."],
                                   capture_output=True).returncode != 0
        except (OSError, subprocess.CalledProcessError):
            pass
    return {"path": str(folder), "commit": commit, "uncommitted_changes": dirty}


def hardware(device: str) -> str:
    from machine import cpu_model  # noqa: PLC0415 (benchmarks/, beside this script)

    cpu = cpu_model()
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (GPU), {os.cpu_count()} CPUs"
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} on {torch.get_num_threads()} threads"


def table(rows: list[dict], backbones: list[str]) -> str:
    lines = ["| setting | method | backbone | iterations | accuracy (non-transductive) | transductive | "
             "spread over seeds | seeds | train s/seed |", "|---|---|---|---|---|---|---|---|---|"]
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
                iterations = sorted({r["spec"]["iterations"] for r in runs if r.get("spec")})
                lines.append(
                    f"| {setting} | {method} | {backbone} | {'/'.join(map(str, iterations)) or '-'} | "
                    f"{statistics.mean(accuracy):.1f} ± {ci:.1f} | "
                    + (f"{statistics.mean(trans):.1f} ({len(trans)} seed{'s' * (len(trans) > 1)})"
                       if trans else "-")
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
    parser.add_argument("--norm", default="batch", choices=["batch", "support", "instance", "layer", "none"],
                        help="The backbone's norm (batch: transductive in training, as MAML's paper).")
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--task-chunk", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=1000, help="Test tasks per run.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default).")
    parser.add_argument("--train-query-shots", type=int, default=QUERY_SHOTS,
                        help="Queries per class in training tasks (test tasks keep 15).")
    parser.add_argument("--transductive-seeds", nargs="*", type=int, default=None,
                        help="Seeds whose test also runs the transductive pass (default: all).")
    parser.add_argument("--final-step-only", action="store_true",
                        help="Test only at the last inner-step count (not step 0 and the others).")
    parser.add_argument("--skip-done", action="store_true",
                        help="Keep a run whose JSON is already in --out instead of rerunning it.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fewshot")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "benchmarks/fewshot.py " + " ".join(sys.argv[1:])
    for setting in args.settings:
        for seed in args.seeds:
            for method in args.methods:
                for backbone in (args.backbones if method != "pixels" else ["-"]):
                    name = f"{setting}-{method}-{backbone}-seed{seed}.json"
                    if args.skip_done and (args.out / name).exists():
                        print(f"{name}: done, kept", file=sys.stderr)
                        continue
                    started, load_before = time.perf_counter(), os.getloadavg()
                    if method == "pixels":
                        result, spec = pixel_floor(setting, seed, args.tasks), None
                    else:
                        spec = job_spec(method, setting, backbone, seed, args)
                        transductive = args.transductive_seeds is None or seed in args.transductive_seeds
                        result = train_and_test(spec, args.device, transductive, args.train_query_shots,
                                                args.final_step_only)
                    row = {"setting": setting, "method": method, "backbone": backbone, "seed": seed,
                           **{k: v for k, v in result.items() if k != "evaluation"},
                           "test_tasks": args.tasks, "wall_seconds": time.perf_counter() - started,
                           "hardware": hardware(args.device),
                           "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                           "command": command, "engine": engine_source(), "spec": spec,
                           "evaluation": result.get("evaluation")}
                    (args.out / name).write_text(json.dumps(row, indent=2))
                    print(f"{setting} {method} {backbone} seed {seed}: "
                          f"{100 * row['accuracy']:.1f} ± {100 * row['ci95']:.1f}", file=sys.stderr)
    # every run in --out, from this invocation or an earlier one
    rows = [json.loads(path.read_text()) for path in sorted(args.out.glob("*-seed*.json"))]
    markdown = table(rows, sorted({r["backbone"] for r in rows if r["backbone"] != "-"}))
    summary = {"command": command, "commands": sorted({r.get("command") or "" for r in rows}),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "hardware": hardware(args.device), "test_tasks": sorted({r.get("test_tasks") or 0 for r in rows}),
               "query_shots": QUERY_SHOTS, "rows": [{k: v for k, v in r.items() if k != "evaluation"}
                                                    for r in rows]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "table.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
