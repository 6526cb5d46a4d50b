"""Few-shot on ``typefaces`` trained until validation accuracy plateaus (issue #30, item 1):
one method and setting of benchmarks/fewshot.py (same job spec, same test tasks, same pixel
floor), several seeds run one after another, each trained with validation every
``--eval-every`` iterations and stopped at the plateau (or ``--max-train-seconds`` /
``--max-iterations``), then tested on ``--tasks`` test tasks, served and transductive.

**Plateau.** Every ``--eval-every`` meta-iterations the model is evaluated, served (each query
image alone, with the support set's statistics, as ``adapt`` serves it), on the same
``--val-tasks`` tasks of the val split (task ``t`` is a function of (seed, "val", 0, t)).
``MA_i`` is the mean of the last ``--window`` val accuracies. Training stops at evaluation ``i``
when the best ``MA`` of the last ``--patience`` evaluations is not more than ``--min-delta``
(default 0.005, half a point) above the best ``MA`` before them. The parameters tested are those
of the evaluation with the best single val accuracy (early stopping on val; the test split is
never looked at before).

**Test.** ``--tasks`` tasks of the test split (the tasks ``benchmarks/fewshot.py`` and its pixel
floor use for that seed), 15 queries per class: served accuracy (what a user gets), the
transductive one (query-batch statistics, MAML's paper) on the same tasks, the raw-pixel
nearest-prototype floor on the same tasks, each mean ± 95 % CI over tasks, and the paired
per-task differences (served − transductive, served − floor) with their CIs. Per-task
accuracies are stored.

    nice -n 10 .venv/bin/python benchmarks/fewshot_converged.py --method protonet --setting 5w1s \\
        --seeds 0 1 2 --max-train-seconds 900

Raw JSON: ``--out`` (default benchmarks/results/fewshot_converged.json) holds one entry per
(setting, method, norm, seed); a rerun replaces its own entries and keeps the others. The
engine's commit (and whether workers/ had uncommitted edits) is recorded per run; with
``METASERVE_SOURCE_TREE`` set to an exported tree (``git archive HEAD``) the engine is imported
from there (``METASERVE_SOURCE_COMMIT`` names its commit), so edits made in the working tree
while a run goes do not reach it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _use_source_tree() -> None:
    """Import ``metaserve`` from ``METASERVE_SOURCE_TREE`` (the editable install maps the
    package names to folders of the working tree; point them at the exported copy instead)."""
    tree = os.environ.get("METASERVE_SOURCE_TREE")
    if not tree:
        return
    try:
        import __editable___metaserve_0_1_0_finder as finder  # noqa: PLC0415
    except ImportError:
        sys.exit("METASERVE_SOURCE_TREE needs the editable install of metaserve")
    finder.MAPPING = {name: str(Path(tree) / Path(folder).relative_to(ROOT))
                      for name, folder in finder.MAPPING.items()}


_use_source_tree()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fewshot  # noqa: E402

PAIRED_DECIMALS = 5


def plateaued(accuracies: list[float], window: int, patience: int, min_delta: float) -> bool:
    """Whether the moving average (``window`` evaluations) of ``accuracies`` has not improved
    by more than ``min_delta`` over its best before the last ``patience`` evaluations."""
    averages = moving_averages(accuracies, window)
    if len(averages) <= patience:
        return False
    return max(averages[-patience:]) <= max(averages[:-patience]) + min_delta


def moving_averages(accuracies: list[float], window: int) -> list[float]:
    """``MA_i`` for every evaluation with ``window`` values behind it (the first ``window - 1``
    evaluations have none)."""
    return [sum(accuracies[i - window + 1:i + 1]) / window for i in range(window - 1, len(accuracies))]


def served_accuracy(evaluator, params: dict, split: str, tasks: int, step: int,
                    transductive: bool) -> dict[bool, torch.Tensor]:
    """Per-task query accuracy at ``step`` inner steps, served (False) and transductive (True)."""
    curves = fewshot.task_curves(evaluator, params, [step], transductive, split=split, tasks=tasks)
    return {mode: acc[:, 0].double() for mode, (_, acc) in curves.items()}


def summary(values: torch.Tensor) -> dict:
    mean, ci = fewshot.mean_ci(values)
    return {"accuracy": mean, "ci95": ci}


def run_seed(args: argparse.Namespace, seed: int, log) -> dict:
    from metaserve.workers.engine import Trainer

    first_order = args.method == "fomaml"  # MAML's spec with first-order inner gradients
    spec = fewshot.job_spec("maml" if first_order else args.method, args.setting, "conv4", seed, args)
    if first_order:
        spec["algorithm"]["first_order"] = True
        spec["name"] = spec["name"].replace("-maml-", "-fomaml-")
    if args.test_steps:  # e.g. the trained horizon, for an optimizer learned for those steps
        spec["evaluation"]["inner_steps"] = [args.test_steps]
    step = max(spec["evaluation"]["inner_steps"])
    train_spec = copy.deepcopy(spec)
    train_spec["task_family"]["query_shots"] = args.train_query_shots
    trainer = Trainer(train_spec, device=args.device)
    evaluator = Trainer(spec, device=args.device)
    state = trainer.init_state()
    curve: list[dict] = []
    best = {"val_accuracy": -1.0, "iteration": 0, "params": None}
    started, cpu_started = time.perf_counter(), time.process_time()
    train_seconds = eval_seconds = 0.0
    train_accuracies: list[float] = []
    stop_reason = None
    while stop_reason is None:
        if state.iteration % args.eval_every == 0:
            t0 = time.perf_counter()
            val = served_accuracy(evaluator, state.params, "val", args.val_tasks, step, False)[False]
            eval_seconds += time.perf_counter() - t0
            point = {"iteration": state.iteration, **{f"val_{k}": v for k, v in summary(val).items()},
                     "train_query_accuracy": (sum(train_accuracies) / len(train_accuracies)
                                              if train_accuracies else None),
                     "wall_seconds": time.perf_counter() - started,
                     "cpu_seconds": time.process_time() - cpu_started,
                     "load_average_1min": os.getloadavg()[0]}
            train_accuracies = []
            curve.append(point)
            accuracies = [p["val_accuracy"] for p in curve]
            averages = moving_averages(accuracies, args.window)
            point["val_moving_average"] = averages[-1] if len(accuracies) >= args.window else None
            if point["val_accuracy"] > best["val_accuracy"]:
                best = {"val_accuracy": point["val_accuracy"], "iteration": state.iteration,
                        "params": {name: value.detach().clone() for name, value in state.params.items()}}
            log(f"seed {seed} it {state.iteration}: val {100 * point['val_accuracy']:.1f} "
                f"± {100 * point['val_ci95']:.1f} MA {point['val_moving_average']} "
                f"wall {point['wall_seconds']:.0f}s load {point['load_average_1min']:.1f}")
            partial = args.out.with_suffix(".partial.json")  # the curve so far, should the run die
            partial.write_text(json.dumps({"setting": args.setting, "method": args.method, "norm": args.norm,
                                           "seed": seed, "spec": spec, "curve": curve}, indent=1) + "\n")
            if plateaued(accuracies, args.window, args.patience, args.min_delta):
                stop_reason = "plateau"
            elif state.iteration >= args.max_iterations:
                stop_reason = "max_iterations"
            elif time.perf_counter() - started >= args.max_train_seconds:
                stop_reason = "max_train_seconds"
            if stop_reason:
                break
        t0 = time.perf_counter()
        state, metrics = trainer.step(state)
        train_seconds += time.perf_counter() - t0
        if metrics.get("train/accuracy_after") is not None:
            train_accuracies.append(metrics["train/accuracy_after"])
    trainer.close()
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)  # the result has the curve
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started

    t0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    test = served_accuracy(evaluator, best["params"], "test", args.tasks, step,
                           evaluator.algorithm.trains_transductive)
    floor = fewshot.pixel_floor_tasks(args.setting, seed, args.tasks)
    evaluator.close()
    result = {
        "setting": args.setting, "method": args.method, "norm": args.norm, "backbone": "conv4",
        "seed": seed, "stop_reason": stop_reason, "iterations": state.iteration,
        "tested_iteration": best["iteration"], "best_val_accuracy": best["val_accuracy"],
        "episodes": state.iteration * args.meta_batch_size,
        "train_wall_seconds": wall, "train_cpu_seconds": cpu,
        "train_step_wall_seconds": train_seconds, "val_eval_wall_seconds": eval_seconds,
        "curve": curve, "inner_steps_at_test": step, "test_tasks": args.tasks,
        "served": summary(test[False]),
        "transductive": summary(test[True]) if True in test else None,
        "pixel_floor": summary(floor),
        "served_minus_floor": summary(test[False] - floor),
        "served_minus_transductive": summary(test[False] - test[True]) if True in test else None,
        "test_wall_seconds": time.perf_counter() - t0, "test_cpu_seconds": time.process_time() - cpu0,
        "load_average_1min_test_before_after": [load0, os.getloadavg()[0]],
        "per_task": {"served": [round(v, PAIRED_DECIMALS) for v in test[False].tolist()],
                     "transductive": ([round(v, PAIRED_DECIMALS) for v in test[True].tolist()]
                                      if True in test else None),
                     "pixel_floor": [round(v, PAIRED_DECIMALS) for v in floor.tolist()]},
        "spec": spec, "train_query_shots": args.train_query_shots,
    }
    transductive = (f", transductive {100 * result['transductive']['accuracy']:.1f}"
                    if result["transductive"] else "")
    log(f"seed {seed}: stop {stop_reason} at {state.iteration}, tested it {best['iteration']}: served "
        f"{100 * result['served']['accuracy']:.1f} ± {100 * result['served']['ci95']:.1f}, floor "
        f"{100 * result['pixel_floor']['accuracy']:.1f}{transductive}")
    return result


METHODS = ("protonet", "anil", "maml", "fomaml", "mamlpp", "metacurvature")  # also the tables' row order
CAP_MARKS = {"max_train_seconds": "†", "max_iterations": "‡"}  # stopped by a cap, not the plateau
SUMMARIZED = ("served", "pixel_floor", "served_minus_floor", "transductive", "served_minus_transductive")


def group_summaries(document: dict) -> list[dict]:
    """One summary per (setting, method, norm) over its seeds, for each of :data:`SUMMARIZED`
    (in %): ``{key}_mean`` and ``{key}_ci`` — one seed: its mean ± the 95 % CI over its test
    tasks; several: the mean of the seeds' means ± the 95 % t-interval over those means (the
    seed-to-seed spread, what a rerun would move) — and ``{key}_min``/``{key}_max``;
    ``stopped_at``: each seed's last iteration, marked † where the time cap stopped it and ‡ the
    iteration cap (bare: the plateau); ``tested_at``: the iterations whose parameters were tested."""
    from seed_stats import t_interval  # noqa: PLC0415

    groups: dict[tuple, list[dict]] = {}
    for run in document["runs"]:
        groups.setdefault((run["setting"], run["method"], run["norm"]), []).append(run)
    summaries = []
    for (setting, method, norm), runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        summary = {"setting": setting, "method": method, "norm": norm, "n": len(runs),
                   "seeds": ", ".join(str(r["seed"]) for r in runs),
                   "stop": ", ".join(str(r.get("stop_reason")) for r in runs),
                   "iterations": ", ".join(str(r.get("iterations")) for r in runs),
                   "stopped_at": ", ".join(f"{r.get('iterations')}{CAP_MARKS.get(r.get('stop_reason'), '')}"
                                           for r in runs),
                   "tested_at": ", ".join(str(r.get("tested_iteration")) for r in runs),
                   "meta_batch": (runs[0].get("spec") or {}).get("meta_batch_size"),
                   "train_wall_seconds": ", ".join(str(round(r.get("train_wall_seconds") or 0)) for r in runs),
                   "interval": "t over seeds" if len(runs) > 1 else "tasks"}
        for key in SUMMARIZED:
            if any(r.get(key) is None for r in runs):
                continue
            means = [100 * r[key]["accuracy"] for r in runs]
            ci = (t_interval(means)["ci95"]
                  if len(means) > 1 else 100 * runs[0][key]["ci95"])
            summary.update({f"{key}_mean": statistics.fmean(means), f"{key}_ci": ci,
                            f"{key}_min": min(means), f"{key}_max": max(means)})
        summaries.append(summary)
    return summaries


def table(document: dict) -> str:
    """Markdown: one row per :func:`group_summaries` entry (min…max of the seeds' means beside
    the interval), then each seed's curve."""
    rows = ["| setting | method | norm | seeds | stop (per seed) | meta-iterations × tasks | train wall s "
            "| served accuracy | pixel floor | served − floor | transductive | served − transductive |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(summary: dict, key: str) -> str:
        if f"{key}_mean" not in summary:
            return "–"
        mean = summary[f"{key}_mean"]
        spread = f" ({summary[f'{key}_min']:.1f}…{summary[f'{key}_max']:.1f})" if summary["n"] > 1 else ""
        return f"{mean:{'+' if 'minus' in key else ''}.1f} ± {summary[f'{key}_ci']:.1f}{spread}"

    for summary in group_summaries(document):
        rows.append(
            f"| {summary['setting']} | {summary['method']} | {summary['norm']} | {summary['seeds']} | "
            f"{summary['stop']} | {summary['iterations']} × {summary['meta_batch']} | "
            f"{summary['train_wall_seconds']} | "
            + " | ".join(cell(summary, key) for key in SUMMARIZED) + " |")
    curves = []
    for run in sorted(document["runs"], key=lambda r: (r["setting"], r["method"], r["norm"], r["seed"])):
        points = ", ".join(f"{p['iteration']}: {100 * p['val_accuracy']:.1f}" for p in run["curve"])
        curves.append(f"- {run['setting']} {run['method']} {run['norm']} seed {run['seed']} (val %, served, "
                      f"by meta-iteration; tested at {run['tested_iteration']}): {points}")
    return "\n".join(rows + [""] + curves)


def compare(first: str, second: str, inputs: list[Path]) -> dict:
    """``first`` − ``second`` (each ``setting:method:norm``), served accuracy in points, over
    the seeds both have: per seed paired by test task (a seed's test tasks are the same for
    every method: checked on their pixel floors), and over seeds a paired t-test of the seed
    means (:func:`seed_stats.paired_over_seeds`)."""
    from seed_stats import paired_over_seeds  # noqa: PLC0415

    runs: dict[tuple[str, int], dict] = {}
    for path in inputs:
        for run in json.loads(path.read_text())["runs"]:
            runs[(f"{run['setting']}:{run['method']}:{run['norm']}", run["seed"])] = run
    seeds = sorted(seed for group, seed in runs if group == first and (second, seed) in runs)
    if len(seeds) < 2:
        raise SystemExit(f"{first} and {second} share {len(seeds)} seed(s) in {inputs}; 2 needed")
    per_seed, means = [], {first: [], second: []}
    for seed in seeds:
        a, b = runs[(first, seed)], runs[(second, seed)]
        if a["per_task"]["pixel_floor"] != b["per_task"]["pixel_floor"]:
            raise SystemExit(f"seed {seed}: {first} and {second} were tested on different tasks")
        difference = 100 * (torch.tensor(a["per_task"]["served"], dtype=torch.float64)
                            - torch.tensor(b["per_task"]["served"], dtype=torch.float64))
        mean, ci = fewshot.mean_ci(difference)
        per_seed.append({"seed": seed, "first": 100 * a["served"]["accuracy"],
                         "second": 100 * b["served"]["accuracy"], "difference": mean, "ci95": ci,
                         "tasks": len(difference), "iterations": [a["iterations"], b["iterations"]]})
        means[first].append(100 * a["served"]["accuracy"])
        means[second].append(100 * b["served"]["accuracy"])
    return {"first": first, "second": second, "seeds": seeds, "per_seed": per_seed,
            "over_seeds": paired_over_seeds(means[first], means[second]),
            "inputs": [str(path) for path in inputs],
            "note": "served accuracy, points; per seed: mean ± 95 % CI of the per-task differences; "
                    "over seeds: mean of the seed differences ± 95 % t-interval, paired t-test"}


def write(path: Path, document: dict) -> None:
    """``document`` with its runs in table order (setting, method, norm, seed) and its ``groups``
    (:func:`group_summaries`) brought up to date."""
    settings = list(fewshot.SETTINGS)
    document["runs"].sort(key=lambda r: (settings.index(r["setting"]), METHODS.index(r["method"]),
                                         r["norm"] != "batch", r["norm"], r["seed"]))
    document["groups"] = group_summaries(document)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="protonet", choices=METHODS)
    parser.add_argument("--setting", default="5w1s", choices=list(fewshot.SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--norm", default="batch", choices=["batch", "support", "instance", "layer", "none"])
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--train-query-shots", type=int, default=5,
                        help="Queries per class in training tasks (test and val tasks keep 15).")
    parser.add_argument("--eval-every", type=int, default=100, help="Meta-iterations between val evaluations.")
    parser.add_argument("--val-tasks", type=int, default=100)
    parser.add_argument("--window", type=int, default=3, help="Val evaluations in the moving average.")
    parser.add_argument("--patience", type=int, default=4, help="Evaluations without improvement to stop.")
    parser.add_argument("--min-delta", type=float, default=0.005, help="Improvement that counts (0.005: half a point).")
    parser.add_argument("--max-iterations", type=int, default=20_000)
    parser.add_argument("--test-steps", type=int, default=0,
                        help="Inner steps at validation and test (0: the setting's protocol, MAML's "
                             "paper: 3 for 5-way after 1 in training, 5 for 20-way).")
    parser.add_argument("--max-train-seconds", type=float, default=1800, help="Wall-time cap per seed (training).")
    parser.add_argument("--tasks", type=int, default=1000, help="Test tasks per seed.")
    parser.add_argument("--task-chunk", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fewshot_converged.json")
    parser.add_argument("--table", action="store_true",
                        help="Print the Markdown table of --out, refresh its `groups`, and exit.")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="A − B (setting:method:norm) paired per seed over the runs of --inputs; "
                             "the result replaces its entry in --out's `comparisons`, and exit.")
    parser.add_argument("--inputs", nargs="+", type=Path, default=[])
    args = parser.parse_args(argv)
    if args.compare:
        result = compare(*args.compare, args.inputs or [args.out])
        document = json.loads(args.out.read_text()) if args.out.exists() else {}
        document["comparisons"] = [c for c in document.get("comparisons", [])
                                   if (c["first"], c["second"]) != tuple(args.compare)] + [result]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return result
    if args.table:
        document = json.loads(args.out.read_text())
        write(args.out, document)
        print(table(document))
        return document
    for name in ("eval_every", "val_tasks", "window", "patience", "tasks", "meta_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.val_tasks < 2 or args.tasks < 2:
        parser.error("--val-tasks and --tasks must be at least 2 (a CI needs two tasks)")
    args.iterations = args.max_iterations  # job_spec's fields
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "benchmarks/fewshot_converged.py " + " ".join(sys.argv[1:] if argv is None else argv)
    engine = fewshot.engine_source()

    def log(message: str) -> None:
        print(time.strftime("%H:%M:%S ") + message, file=sys.stderr, flush=True)

    for seed in args.seeds:
        run = run_seed(args, seed, log)
        run.update({"command": command, "engine": engine, "hardware": fewshot.hardware(args.device),
                    "nice": os.nice(0), "plateau": {"eval_every": args.eval_every, "val_tasks": args.val_tasks,
                                                    "window": args.window, "patience": args.patience,
                                                    "min_delta": args.min_delta,
                                                    "max_train_seconds": args.max_train_seconds,
                                                    "max_iterations": args.max_iterations},
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        document = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
        key = (run["setting"], run["method"], run["norm"], run["seed"])
        document["runs"] = [r for r in document["runs"]
                            if (r["setting"], r["method"], r["norm"], r["seed"]) != key] + [run]
        write(args.out, document)
    return document


if __name__ == "__main__":
    main()
