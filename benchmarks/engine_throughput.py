"""Meta-training throughput of the engine against the same step written with `higher`.

Sine regression, MLP 1-40-40-1 ReLU, meta-batch 25, 10 support + 10 query shots, outer Adam,
torch threads = 1. One meta-iteration = sample 25 tasks, adapt, meta-gradient, outer step.
`higher` (Grefenstette et al. 2019) runs the textbook per-task loop
(``innerloop_ctx`` per task, ``backward`` per task); the engine runs ``Trainer.step``
(vmap over tasks). Every configuration runs in its own process (so peak RSS is its own), the
configurations interleaved over ``--rounds`` rounds; the best round is reported.

    python benchmarks/engine_throughput.py [--rounds 3] [--iterations 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

CONFIGS = [
    # (implementation, algorithm spec)
    ("higher", {"name": "maml", "inner_steps": 1}),
    ("engine", {"name": "maml", "inner_steps": 1}),
    ("higher", {"name": "maml", "inner_steps": 5}),
    ("engine", {"name": "maml", "inner_steps": 5}),
    ("higher", {"name": "maml", "inner_steps": 1, "first_order": True}),
    ("engine", {"name": "maml", "inner_steps": 1, "first_order": True}),
    ("engine", {"name": "reptile", "inner_steps": 5}),
    ("engine", {"name": "anil", "inner_steps": 1}),
    ("engine", {"name": "anil", "inner_steps": 5}),
    ("engine", {"name": "metasgd", "inner_steps": 1}),
    ("engine", {"name": "prompt", "inner_steps": 1}),
    ("engine", {"name": "prompt", "inner_steps": 5}),
]
META_BATCH = 25


def _label(algorithm: dict) -> str:
    name = "fomaml" if algorithm.get("first_order") else algorithm["name"]
    return f"{name}-{algorithm['inner_steps']}step"


def _spec(algorithm: dict) -> dict:
    return {"algorithm": {"inner_lr": 0.01, **algorithm}, "task_family": {"name": "sine"},
            "model": {"name": "mlp", "hidden": [40, 40]}, "meta_batch_size": META_BATCH,
            "outer_optimizer": {"name": "adam", "lr": 0.001}}


def _engine_stepper(algorithm: dict):
    from metaserve.workers.engine import Trainer

    trainer = Trainer(_spec(algorithm))
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


def measure(implementation: str, algorithm: dict, iterations: int) -> dict:
    """Run in a child process: tasks per second and peak RSS of one configuration."""
    import torch

    torch.set_num_threads(1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = (_engine_stepper if implementation == "engine" else _higher_stepper)(algorithm)
    warmup = max(3, iterations // 10)
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(iterations):
        step()
    seconds = (time.perf_counter() - started) / iterations
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"implementation": implementation, "config": _label(algorithm), "ms_per_iteration": seconds * 1e3,
            "tasks_per_second": META_BATCH / seconds, "peak_rss_mib": rss_after / 1024,
            "rss_growth_mib": (rss_after - rss_before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=60, help="timed iterations per engine configuration")
    parser.add_argument("--json", type=__import__("pathlib").Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        implementation, algorithm = json.loads(args.child)
        print(json.dumps(measure(implementation, algorithm, args.iterations)))
        return
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for implementation, algorithm in CONFIGS:
            iterations = args.iterations if implementation == "engine" else max(5, args.iterations // 6)
            done = subprocess.run([sys.executable, __file__, "--iterations", str(iterations),
                                   "--child", json.dumps([implementation, algorithm])],
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            key = (implementation, result["config"])
            if key not in best or result["ms_per_iteration"] < best[key]["ms_per_iteration"]:
                best[key] = result
    rows = []
    for (implementation, config), result in best.items():
        baseline = best.get(("higher", config))
        speedup = baseline["ms_per_iteration"] / result["ms_per_iteration"] if baseline else None
        rows.append({**result, "speedup_vs_higher": None if speedup is None else round(speedup, 2)})
    print(f"{'config':<16}{'impl':<8}{'ms/iter':>9}{'tasks/s':>10}{'x higher':>10}{'peak RSS MiB':>14}")
    for row in rows:
        speedup = "" if row["speedup_vs_higher"] is None else f"{row['speedup_vs_higher']:.1f}"
        print(f"{row['config']:<16}{row['implementation']:<8}{row['ms_per_iteration']:>9.2f}"
              f"{row['tasks_per_second']:>10.0f}{speedup:>10}{row['peak_rss_mib']:>14.0f}")
    if args.json:
        import torch

        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                         "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
