"""PEARL on nav2d (Rakelly et al. 2019) against MAML-RL at equal environment steps.

Trains the spec of ``examples/pearl_nav2d.yaml`` and evaluates it every ``--eval-every``
iterations on validation goals: the adapted return after k = 0, 1, … exploration episodes
(posterior sampling, see :meth:`metaserve.workers.rl.pearl_agent.PEARLAgent.evaluate_tasks`). Records the
environment steps at which each first reached −15, then the final model and the best one on
validation (by the return after the most exploration episodes) on held-out test goals, and
MAML's 1-step return at the same number of environment steps (read from ``--maml``).

``--oracle`` runs the diagnostic instead: PEARL's SAC with the true goal in place of z (no
encoder); it must solve nav2d in a few thousand steps, or the SAC is broken.

    .venv/bin/python benchmarks/rl_pearl_nav2d.py --minutes 30

Every evaluation also reports each return's 95 % CI over the goals and the encoder probe
(``probe_r2_episode{k}``: cross-fitted R² of a linear map from the posterior mean after k
exploration episodes to the goal). The result stores the final model's per-goal test returns
(``per_task_returns``, [episode][goal]) and the load average. ``--seed`` overrides the spec's
seed (training and held-out goals, initialization). The seeds of docs/BENCHMARKS.md
(docs/notes/pearl-nav2d.md)::

    for seed in 0 1 2 3 4; do nice -n 10 .venv/bin/python benchmarks/rl_pearl_nav2d.py --iterations 60 \
        --minutes 11 --eval-tasks 100 --seed $seed --out benchmarks/results/rl_pearl_seeds/seed$seed.json; done
    .venv/bin/python benchmarks/rl_pearl_nav2d.py --summarize benchmarks/results/rl_pearl_seeds/seed?.json \
        --out benchmarks/results/rl_pearl_seeds/summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import ray
import torch
import yaml

TARGET = -15.0
SPEC = Path("examples/pearl_nav2d.yaml")


def maml_return_at(steps: int, maml: dict) -> dict:
    """MAML's 1-step return at the last evaluation with at most ``steps`` env steps."""
    before = [p for p in maml.get("curve", []) if p["env_steps"] <= steps]
    if not before:
        return {"env_steps": 0, "val/return_step1": None,
                "note": f"MAML's first evaluation is at {maml['curve'][0]['env_steps']} env steps "
                        "(its untrained initialization before that)"}
    point = before[-1]
    return {"env_steps": point["env_steps"], "val/return_step1": point["val/return_step1"]}


def oracle(args: argparse.Namespace, spec_document: dict) -> None:
    """SAC of workers.rl.pearl with z = the true goal: the diagnostic of the RL half alone."""
    from metaserve.workers.rl.pearl import PEARL
    from metaserve.workers.rl.pearl_agent import play_episodes
    from metaserve.workers.spec import JobSpec

    class Oracle(PEARL):
        def _context(self, task, generator):  # noqa: ANN001, ANN202
            return None

        def _latent(self, tasks, context, generator):  # noqa: ANN001, ANN202
            return self.train_goals[tasks], torch.zeros(())

        def collect(self) -> float:
            generator = self._generator(self.iteration, 1 << 30)
            tasks = torch.randperm(self.config.train_tasks, generator=generator)[:self.config.tasks_per_iteration]
            goals = self.train_goals[tasks]
            episodes = play_episodes(self.agent, self.spec.task_family, goals, goals, generator)
            for row, task in enumerate(tasks.tolist()):
                self.buffer.add(task, episodes, row)
            self.env_steps += int(episodes.mask.sum())
            return float(episodes.rewards.sum(1).mean())

    spec_document["algorithm"] = {**spec_document["algorithm"], "latent_dim": 2}
    spec = JobSpec.model_validate(spec_document)
    agent = Oracle(spec)
    held_out = agent.family.sample_tasks(seed=spec.seed, split="val", iteration=0,
                                         task_indices=range(args.eval_tasks))
    goals = torch.from_numpy(np.stack([t["goal"] for t in held_out])).float()
    curve, started = [], time.monotonic()
    while agent.iteration < args.iterations and time.monotonic() - started < args.minutes * 60:
        train = agent.train_iteration()
        if agent.iteration % args.eval_every == 0:
            episodes = play_episodes(agent.agent, spec.task_family, goals, goals,
                                      torch.Generator().manual_seed(0), deterministic=True)
            point = {"iteration": agent.iteration, "env_steps": agent.env_steps,
                     "seconds": round(time.monotonic() - started, 1), **train,
                     "val/return_true_goal": float(episodes.rewards.sum(1).mean())}
            curve.append(point)
            print(json.dumps(point), flush=True)
    args.out.write_text(json.dumps({"diagnostic": "SAC with the true goal as z", "curve": curve,
                                    "spec": spec.model_dump(mode="json")}, indent=2))


EPISODES = (0, 1, 2, 3)


def summarize(files: list[Path], out: Path) -> dict:
    """Over seeds (each run's mean over its own test goals is one observation): the return
    after k exploration episodes, the control (z from another goal's posterior), the paired
    own − other and after-3 − after-0 gaps with one-sample t-tests over seeds, and the probe's
    R²; mean ± 95 % t-interval (df = seeds − 1)."""
    import sys  # noqa: PLC0415

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from seed_stats import paired_over_seeds, t_interval  # noqa: PLC0415

    runs = [json.loads(path.read_text()) for path in files]
    tests = [run["test"] for run in runs]

    def over(key: str) -> dict:
        return t_interval([test[f"test/{key}"] for test in tests])

    def column(key: str) -> list[float]:
        return [test[f"test/{key}"] for test in tests]

    summary = {
        "seeds": [run["spec"]["seed"] for run in runs], "n": len(runs),
        "test_goals_per_seed": len(runs[0]["per_task_returns"][0]),
        "env_steps": t_interval([run["env_steps"] for run in runs]),
        "train_seconds": t_interval([run["train_seconds"] for run in runs]),
        "load_average": {"min": min(min(run["load_average"].values()) for run in runs),
                         "max": max(max(run["load_average"].values()) for run in runs)},
        "return": {f"after_{k}": over(f"return_episode{k}") for k in EPISODES},
        "other_goal": {f"after_{k}": over(f"return_episode{k}_other_task") for k in EPISODES if k},
        "own_minus_other_goal": {
            f"after_{k}": paired_over_seeds(column(f"return_episode{k}"),
                                            column(f"return_episode{k}_other_task"))
            for k in EPISODES if k},
        "after_3_minus_after_0": paired_over_seeds(column("return_episode3"),
                                                   column("return_episode0")),
        "probe_r2": {f"after_{k}": over(f"probe_r2_episode{k}") for k in EPISODES if k},
        "reached_minus_15": sum(bool(run["reached_minus_15"]) for run in runs),
        "files": [str(path) for path in files],
        "note": "over seeds: mean of the per-seed means over test goals ± 95 % t-interval; "
                "tests over seeds are one-sample t-tests of the per-seed differences"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-tasks", type=int, default=50)
    parser.add_argument("--final-tasks", type=int, default=200)
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--oracle", action="store_true", help="the true-goal SAC diagnostic")
    parser.add_argument("--seed", type=int, default=None, help="instead of the spec's seed")
    parser.add_argument("--maml", type=Path, default=Path("benchmarks/results/rl_maml_nav2d.json"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rl_pearl_nav2d.json"))
    parser.add_argument("--summarize", type=Path, nargs="+", metavar="RUN_JSON",
                        help="Summarize these runs' test returns over seeds into --out, and exit.")
    args = parser.parse_args()
    if args.summarize:
        print(json.dumps(summarize(args.summarize, args.out), indent=1))
        return
    torch.set_num_threads(1)
    document = yaml.safe_load(args.spec.read_text())
    if args.seed is not None:
        document["seed"] = args.seed
    load_before = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.oracle:
        oracle(args, document)
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from metaserve.workers.rl.pearl import PEARL
    from metaserve.workers.spec import JobSpec

    spec = JobSpec.model_validate(document)
    pearl = PEARL(spec)
    episodes = spec.algorithm.adaptation_episodes
    last = f"val/return_episode{episodes - 1}"
    curve, reached, best = [], {}, None
    started = time.monotonic()
    while pearl.iteration < args.iterations and time.monotonic() - started < args.minutes * 60:
        train = pearl.train_iteration()
        if pearl.iteration % args.eval_every == 0:
            evaluation = pearl.evaluate("val", tasks=args.eval_tasks)
            point = {"iteration": pearl.iteration, "env_steps": pearl.env_steps,
                     "seconds": round(time.monotonic() - started, 1), **train, **evaluation}
            curve.append(point)
            print(json.dumps(point), flush=True)
            for k in range(episodes):
                if f"after_{k}_episodes" not in reached and evaluation[f"val/return_episode{k}"] >= TARGET:
                    reached[f"after_{k}_episodes"] = {"iteration": pearl.iteration,
                                                      "env_steps": pearl.env_steps}
            if best is None or evaluation[last] > best[0][last]:
                best = (evaluation, pearl.iteration, pearl.env_steps,
                        {k: v.detach().clone() for k, v in pearl.agent.state_dict().items()})
    seconds = time.monotonic() - started
    per_task, final = pearl.adaptation_returns("test", tasks=args.final_tasks)
    selected = None
    if best is not None:
        pearl.agent.load_state_dict(best[3])
        selected = {"iteration": best[1], "env_steps": best[2], **best[0],
                    **pearl.evaluate("test", tasks=args.final_tasks)}
    maml = json.loads(args.maml.read_text()) if args.maml.exists() else None
    result = {"iterations": pearl.iteration, "env_steps": pearl.env_steps,
              "train_seconds": round(seconds, 1), "seconds_per_iteration": round(seconds / max(pearl.iteration, 1), 2),
              "load_average": {"before": load_before[0], "after": os.getloadavg()[0]},
              "test": final, "per_task_returns": per_task.round(3).tolist(), "best_on_val": selected,
              "reached_minus_15": reached, "maml_file": str(args.maml),
              "maml_at_equal_env_steps": maml_return_at(pearl.env_steps, maml) if maml else None,
              "maml_reached_minus_15": maml.get("reached_minus_15") if maml else None,
              "torch_threads": torch.get_num_threads(),
              "spec": spec.model_dump(mode="json"), "curve": curve}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "spec", "per_task_returns")}))
    pearl.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
