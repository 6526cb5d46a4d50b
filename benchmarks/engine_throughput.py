"""Meta-training throughput of the engine against the same step written with `higher`.

Sine regression, MLP 1-40-40-1 ReLU, meta-batch 25, 10 support + 10 query shots, outer Adam,
torch threads = 1. One meta-iteration = sample 25 tasks, adapt, meta-gradient, outer step.
Implementations:

- ``higher`` (Grefenstette et al. 2019): the textbook per-task loop (``innerloop_ctx`` per
  task, ``backward`` per task);
- ``engine``: ``Trainer.step`` as configured by default (the batched fast path where it
  applies, :mod:`metaserve.workers.algorithms.batched`);
- ``vmap``: ``Trainer.step`` with ``resources.fast_path: false`` (the plain vmapped step);
- ``train``: ``metaserve train`` end to end, run in the child as the CLI runs it (its loop,
  progress bar, metrics file, default evaluation every 500 iterations and checkpoint every
  500): 1,000 iterations, the per-iteration time is the wall time between the log rows at
  iterations 500 and 1,000 (so one periodic evaluation and one checkpoint are inside it, as
  in a long job); process start, the first 500 iterations and the final evaluation are not;
- ``conv4``: ``Trainer.step`` of MAML on conv4 (64 filters), glyphs 5-way 1-shot, 15
  queries per class, meta-batch 32 (the Ray benchmark's configuration).

``--before COMMIT`` also runs the ``engine``, ``train`` and ``conv4`` configurations on the
code of an earlier commit (``git archive`` into a temporary directory, imported first on
``PYTHONPATH``), labelled ``before``: the before/after comparison in the same run. Every
configuration runs in its own process (so peak RSS is its own), the configurations
interleaved over ``--rounds`` rounds; the best round is reported (and every round's time).

    python benchmarks/engine_throughput.py [--rounds 3] [--iterations 60] [--before 988202f] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SINE_CONFIGS = [
    # (implementation, algorithm spec)
    ("higher", {"name": "maml", "inner_steps": 1}),
    ("engine", {"name": "maml", "inner_steps": 1}),
    ("vmap", {"name": "maml", "inner_steps": 1}),
    ("train", {"name": "maml", "inner_steps": 1}),
    ("higher", {"name": "maml", "inner_steps": 5}),
    ("engine", {"name": "maml", "inner_steps": 5}),
    ("vmap", {"name": "maml", "inner_steps": 5}),
    ("train", {"name": "maml", "inner_steps": 5}),
    ("higher", {"name": "maml", "inner_steps": 1, "first_order": True}),
    ("engine", {"name": "maml", "inner_steps": 1, "first_order": True}),
    ("engine", {"name": "reptile", "inner_steps": 5}),
    ("engine", {"name": "anil", "inner_steps": 1}),
    ("engine", {"name": "anil", "inner_steps": 5}),
    ("engine", {"name": "metasgd", "inner_steps": 1}),
    ("engine", {"name": "prompt", "inner_steps": 1}),
    ("engine", {"name": "prompt", "inner_steps": 5}),
    ("conv4", {"name": "maml", "inner_steps": 1, "inner_lr": 0.4}),
]
BEFORE = ("engine", "train", "conv4")  # also run on the --before commit
META_BATCH = 25
TRAIN_ITERATIONS, TRAIN_WINDOW_START = 1000, 500
CONV4_META_BATCH, CONV4_ITERATIONS = 32, 2


def _label(algorithm: dict) -> str:
    name = "fomaml" if algorithm.get("first_order") else algorithm["name"]
    return f"{name}-{algorithm['inner_steps']}step"


def _spec(algorithm: dict, *, fast_path: bool = True) -> dict:
    spec = {"algorithm": {"inner_lr": 0.01, **algorithm}, "task_family": {"name": "sine"},
            "model": {"name": "mlp", "hidden": [40, 40]}, "meta_batch_size": META_BATCH,
            "outer_optimizer": {"name": "adam", "lr": 0.001}}
    if not fast_path:  # a field older commits do not have: only set when switched off
        spec["resources"] = {"fast_path": False}
    return spec


def _conv4_spec(algorithm: dict) -> dict:
    return {"algorithm": algorithm,
            "task_family": {"name": "glyphs", "ways": 5, "support_shots": 1, "query_shots": 15},
            "model": {"name": "conv4", "filters": 64}, "meta_batch_size": CONV4_META_BATCH,
            "outer_optimizer": {"name": "adam", "lr": 0.001}}


def _trainer_stepper(spec: dict):
    from metaserve.workers.engine import Trainer

    trainer = Trainer(spec)
    state = [trainer.init_state()]

    def step() -> None:
        state[0], _ = trainer.step(state[0])

    return step


def _higher_stepper(algorithm: dict):
    import higher
    import torch

    from metaserve.workers.spec import SineSpec
    from metaserve.workers.tasks import build_task_family

    family = build_task_family(SineSpec())
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                              torch.nn.Linear(40, 1))
    outer = torch.optim.Adam(net.parameters(), lr=0.001)
    inner = torch.optim.SGD(net.parameters(), lr=algorithm.get("inner_lr", 0.01))
    second_order = not algorithm.get("first_order", False)
    iteration = [0]

    def step() -> None:
        batch = family.sample(seed=0, split="train", iteration=iteration[0], task_indices=range(META_BATCH))
        iteration[0] += 1
        outer.zero_grad()
        for task in range(META_BATCH):
            with higher.innerloop_ctx(net, inner, copy_initial_weights=False,
                                      track_higher_grads=second_order) as (fnet, diffopt):
                for _ in range(algorithm["inner_steps"]):
                    diffopt.step(torch.nn.functional.mse_loss(fnet(batch.support_x[task]), batch.support_y[task]))
                loss = torch.nn.functional.mse_loss(fnet(batch.query_x[task]), batch.query_y[task]) / META_BATCH
                if second_order:
                    loss.backward()
                else:  # FOMAML: gradient at the adapted weights, applied to θ
                    grads = torch.autograd.grad(loss, fnet.parameters())
                    for parameter, grad in zip(net.parameters(), grads):
                        parameter.grad = grad if parameter.grad is None else parameter.grad + grad
        outer.step()

    return step


def _timed_steps(step, iterations: int) -> float:
    """Seconds per call of ``step`` over ``iterations`` calls, after a warm-up."""
    for _ in range(max(3, iterations // 10) if iterations >= 5 else 1):
        step()
    started = time.perf_counter()
    for _ in range(iterations):
        step()
    return (time.perf_counter() - started) / iterations


def _train_end_to_end(algorithm: dict) -> float:
    """Seconds per iteration of ``metaserve train`` between the log rows at iterations
    TRAIN_WINDOW_START and TRAIN_ITERATIONS (see the module docstring)."""
    import yaml

    from metaserve.cli import app

    with tempfile.TemporaryDirectory() as directory:
        spec_path, out = Path(directory) / "spec.yaml", Path(directory) / "out"
        spec_path.write_text(yaml.safe_dump({**_spec(algorithm), "iterations": TRAIN_ITERATIONS}))
        try:
            app(["train", str(spec_path), "--out", str(out)])
        except SystemExit as finished:  # the command exits when done
            if finished.code not in (0, None):
                raise
        times = {}
        for line in (out / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if any(name.endswith("tasks_per_second") for name in row["metrics"]):  # a log row
                times[row["step"]] = row["time"]
    return (times[TRAIN_ITERATIONS] - times[TRAIN_WINDOW_START]) / (TRAIN_ITERATIONS - TRAIN_WINDOW_START)


def measure(implementation: str, algorithm: dict, iterations: int) -> dict:
    """Run in a child process: time per iteration, tasks per second and peak RSS of one
    configuration."""
    import torch

    torch.set_num_threads(1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    meta_batch = META_BATCH
    if implementation == "train":
        seconds = _train_end_to_end(algorithm)
    elif implementation == "conv4":
        meta_batch = CONV4_META_BATCH
        seconds = _timed_steps(_trainer_stepper(_conv4_spec(algorithm)), CONV4_ITERATIONS)
    elif implementation == "higher":
        seconds = _timed_steps(_higher_stepper(algorithm), iterations)
    else:
        seconds = _timed_steps(_trainer_stepper(_spec(algorithm, fast_path=implementation != "vmap")), iterations)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = ("conv4-5way1shot-" if implementation == "conv4" else "") + _label(algorithm)
    return {"implementation": implementation, "config": config, "ms_per_iteration": seconds * 1e3,
            "tasks_per_second": meta_batch / seconds, "peak_rss_mib": rss_after / 1024,
            "rss_growth_mib": (rss_after - rss_before) / 1024}


def _checkout(commit: str, directory: Path) -> Path:
    """The code of ``commit`` importable as ``metaserve`` from the returned directory."""
    root = Path(__file__).resolve().parent.parent
    source, package = directory / "src", directory / "pkg" / "metaserve"
    source.mkdir(parents=True)
    package.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(root), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    (package / "__init__.py").write_bytes((source / "metaserve" / "__init__.py").read_bytes())
    for folder in ("api", "service", "workers", "migrations"):
        (package / folder).symlink_to(source / folder)
    return package.parent


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=60, help="timed iterations per engine configuration")
    parser.add_argument("--before", help="also run the engine, train and conv4 configurations on this commit")
    parser.add_argument("--only", help="comma-separated implementations to run (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        implementation, algorithm = json.loads(args.child)
        print(json.dumps(measure(implementation, algorithm, args.iterations)))
        return
    only = set(args.only.split(",")) if args.only else None
    runs = [(implementation, algorithm, None) for implementation, algorithm in SINE_CONFIGS
            if only is None or implementation in only]
    scratch = tempfile.TemporaryDirectory()
    if args.before:
        before_path = _checkout(args.before, Path(scratch.name))
        runs += [(implementation, algorithm, before_path) for implementation, algorithm, _ in list(runs)
                 if implementation in BEFORE]
    best: dict[tuple[str, str], dict] = {}
    load: list[dict] = []
    for round_index in range(args.rounds):
        load.append({"round": round_index, "start": _load_average(), "time": time.time()})
        for implementation, algorithm, code in runs:
            iterations = args.iterations if implementation != "higher" else max(5, args.iterations // 6)
            env = dict(os.environ)
            if code is not None:
                env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--iterations", str(iterations),
                                   "--child", json.dumps([implementation, algorithm])],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"{implementation} {algorithm} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if code is not None:
                result["implementation"] = f"before:{implementation}"
            key = (result["implementation"], result["config"])
            times = best.get(key, {}).get("round_ms", []) + [round(result["ms_per_iteration"], 3)]
            if key not in best or result["ms_per_iteration"] < best[key]["ms_per_iteration"]:
                best[key] = result
            best[key]["round_ms"] = times
        load[-1]["end"] = _load_average()
    scratch.cleanup()
    rows = []
    for (implementation, config), result in best.items():
        baseline = best.get(("higher", config))
        speedup = baseline["ms_per_iteration"] / result["ms_per_iteration"] if baseline else None
        rows.append({**result, "speedup_vs_higher": None if speedup is None else round(speedup, 2)})
    print(f"{'config':<28}{'impl':<15}{'ms/iter':>10}{'tasks/s':>10}{'x higher':>10}{'peak RSS MiB':>14}")
    for row in rows:
        speedup = "" if row["speedup_vs_higher"] is None else f"{row['speedup_vs_higher']:.1f}"
        print(f"{row['config']:<28}{row['implementation']:<15}{row['ms_per_iteration']:>10.2f}"
              f"{row['tasks_per_second']:>10.0f}{speedup:>10}{row['peak_rss_mib']:>14.0f}")
    print("load average per round (start, end):", [(entry["start"], entry["end"]) for entry in load])
    if args.json:
        import torch

        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                         "cpus": os.cpu_count(), "torch": torch.__version__,
                                         "command": " ".join(sys.argv), "before": args.before,
                                         "load_average": load, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
