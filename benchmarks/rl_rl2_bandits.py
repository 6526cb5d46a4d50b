"""RL² on Bernoulli bandits (Duan et al. 2016, Table 1) against random, UCB1 (c = √2 and c tuned
on training tasks) and Thompson sampling measured on the same held-out tasks, with the
training time and throughput. Paper: (n=10, k=5) 6.7; (n=10, k=10) 6.7; (n=100, k=5) 78.7.

    nice -n 19 .venv/bin/python benchmarks/rl_rl2_bandits.py --pulls 10 --arms 5 --minutes 29 \\
        --anneal-steps 1400000 --eval-trials 10000

(the defaults are the n = 10 settings of docs/BENCHMARKS.md; n = 100 used ``--hidden 128
--gamma 0.95 --trials 64 --envs 64 --minibatch-trials 4 --vf-coeff 0.1 --anneal-steps
9000000 --minutes 60 --eval-trials 10000``).

Training stops at ``--steps`` env steps or after ``--minutes``, whichever comes first; the lr
and entropy schedules run over ``--anneal-steps`` (default ``--steps``). ``--save PREFIX``
writes the learner state (``PREFIX.safetensors`` + ``PREFIX.json``) every ``--save-minutes``
and at the end; ``--resume PREFIX`` continues from it (the env-step count, and so the
schedules, carry on; ``--minutes`` counts this run only).

The result file stores every policy's return on every test task (``per_task_returns``, task i
the same task for every policy) and paired tests of RL² against each baseline
(``paired_tests``: the mean per-task difference, its 95 % CI and a two-sided z-test, n = the
test tasks). ``--summarize FILE...`` writes the across-seed summary of such files (``--out``):
per seed the RL² mean and its paired test against the strongest baseline on the same tasks,
and over seeds the mean ± 95 % t-interval of each policy and of the difference, with a paired
t-test over seeds. Five seeds at n = 10, k = 5 (``docs/notes/rl2-bandits.md``)::

    for seed in 0 1 2 3 4; do nice -n 10 .venv/bin/python benchmarks/rl_rl2_bandits.py \
        --steps 400000 --anneal-steps 350000 --minutes 13 --eval-trials 10000 --seed $seed \
        --out benchmarks/results/rl_rl2_seeds/n10_k5_seed$seed.json; done
    .venv/bin/python benchmarks/rl_rl2_bandits.py --summarize \
        benchmarks/results/rl_rl2_seeds/n10_k5_seed?.json --out benchmarks/results/rl_rl2_seeds/n10_k5.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import ray
from safetensors.torch import load_file, save_file

PAPER = {(10, 5): 6.7, (10, 10): 6.7, (100, 5): 78.7}


RL2_POLICIES = ("rl2", "rl2_greedy")


def paired_test(differences: np.ndarray) -> dict:
    """Mean of per-task differences, its 95 % CI half-width and a two-sided z-test (normal:
    thousands of tasks)."""
    mean = float(differences.mean())
    se = float(differences.std(ddof=1) / math.sqrt(len(differences)))
    z = mean / se if se > 0 else math.inf * np.sign(mean)
    return {"difference": mean, "ci95": 1.96 * se, "z": z, "p_two_sided": math.erfc(abs(z) / math.sqrt(2)),
            "tasks": len(differences)}


def paired_tests(totals: dict[str, np.ndarray]) -> dict:
    """RL² minus every baseline, paired by task."""
    return {f"rl2 - {name}": paired_test(totals["rl2"] - values)
            for name, values in totals.items() if name not in RL2_POLICIES}


def summarize(files: list[Path], out: Path) -> None:
    """Across seeds: each seed's RL² and strongest baseline (largest mean on that seed's tasks)
    with the paired test; over seeds, mean ± 95 % t-interval and a paired t-test."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from seed_stats import paired_over_seeds, t_interval  # noqa: PLC0415

    runs = [json.loads(path.read_text()) for path in files]
    policies = list(runs[0]["per_task_returns"])
    seeds, means = [], {name: [] for name in policies}
    for path, run in zip(files, runs):
        totals = {name: np.asarray(values, dtype=float) for name, values in run["per_task_returns"].items()}
        for name in policies:
            means[name].append(float(totals[name].mean()))
        baselines = {name: values.mean() for name, values in totals.items() if name not in RL2_POLICIES}
        strongest = max(baselines, key=baselines.get)
        seeds.append({"seed": int(run["args"]["seed"]), "file": path.name, "env_steps": run["env_steps"],
                      "train_seconds": run["train_seconds"], "load_average": run.get("load_average"),
                      "rl2": run["test"]["test/rl2_trial_return"],
                      "rl2_ci95": run["test"]["test/rl2_trial_return_ci95"],
                      "strongest_baseline": strongest,
                      "strongest_baseline_return": float(baselines[strongest]),
                      "vs_strongest": run["paired_tests"][f"rl2 - {strongest}"]})

    over_seeds = {name: t_interval(values) for name, values in means.items()}
    comparisons = {f"rl2 - {name}": paired_over_seeds(means["rl2"], means[name])
                   for name in policies if name not in RL2_POLICIES}
    strongest = max((name for name in policies if name not in RL2_POLICIES),
                    key=lambda name: over_seeds[name]["mean"])
    run = runs[0]
    summary = {"pulls": run["pulls"], "arms": run["arms"], "paper_rl2": run["paper_rl2"],
               "seeds": len(runs), "test_tasks_per_seed": len(run["per_task_returns"]["rl2"]),
               "strongest_baseline": strongest, "rl2": over_seeds["rl2"],
               "baseline": over_seeds[strongest], "vs_strongest": comparisons[f"rl2 - {strongest}"],
               "over_seeds": over_seeds, "tests_over_seeds": comparisons,
               "train_seconds": t_interval([r["train_seconds"] for r in runs]),
               "load_average": {"min": min(min(r["load_average"].values()) for r in runs),
                                "max": max(max(r["load_average"].values()) for r in runs)},
               "env_steps": t_interval([r["env_steps"] for r in runs]),
               "per_seed": seeds, "files": [str(path) for path in files],
               "note": "over seeds: mean of the per-seed means ± 95 % t-interval (df = seeds − 1); "
                       "each seed has its own training and test tasks; tests over seeds are "
                       "one-sample t-tests of the per-seed mean differences"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("rl2", "strongest_baseline", "baseline", "vs_strongest")}))


def dumps(result: dict) -> str:
    """The result as indented JSON, each policy's per-task returns on one line."""
    result = dict(result)
    per_task = result.pop("per_task_returns")
    text = json.dumps(result, indent=2)
    lines = ",\n".join(f"    {json.dumps(name)}: {json.dumps(values, separators=(',', ':'))}"
                        for name, values in per_task.items())
    return text[:-2] + ',\n  "per_task_returns": {\n' + lines + "\n  }\n}\n"


def save_state(trainer, curve: list[dict], prefix: Path, train_seconds: float) -> None:  # noqa: ANN001
    """The learner state and the curve so far, written atomically (a kill mid-write keeps the
    previous save)."""
    tensors, document = trainer.state()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix, write in ((".safetensors", lambda path: save_file(tensors, str(path))),
                          (".json", lambda path: path.write_text(
                              json.dumps({"state": document, "curve": curve,
                                          "train_seconds": train_seconds})))):
        partial = prefix.with_suffix(suffix + ".partial")
        write(partial)
        partial.replace(prefix.with_suffix(suffix))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pulls", type=int, default=10)
    parser.add_argument("--arms", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=50_000_000, help="env-step budget")
    parser.add_argument("--anneal-steps", type=int, default=None)
    parser.add_argument("--trials", type=int, default=256, help="trials per iteration")
    parser.add_argument("--minibatch-trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--envs", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--lr-final", type=float, default=0.0002)
    parser.add_argument("--entropy", type=float, default=0.02)
    parser.add_argument("--entropy-final", type=float, default=0.0)
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--gae-lambda", type=float, default=0.9)
    parser.add_argument("--vf-coeff", type=float, default=0.5)
    parser.add_argument("--grad-clip", type=float, default=10.0)
    parser.add_argument("--eval-trials", type=int, default=2000)
    parser.add_argument("--log-every", type=int, default=5, help="iterations between curve points")
    parser.add_argument("--seed", type=int, default=0, help="training and test tasks, init")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--save", type=Path, default=None, help="state file prefix")
    parser.add_argument("--save-minutes", type=float, default=5.0)
    parser.add_argument("--resume", type=Path, default=None, help="state file prefix")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None,
                        help="result files of several seeds: write their summary to --out")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize, args.out or Path("benchmarks/results/rl_rl2_seeds/summary.json"))
        return
    load_before = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from metaserve.workers.rl.rl2 import RL2Trainer, summarize_trial_returns
    from metaserve.workers.spec import JobSpec

    trial_steps = args.pulls
    iterations = -(-args.steps // (args.trials * trial_steps))
    spec = JobSpec.model_validate({
        "algorithm": {"name": "rl2", "hidden_size": args.hidden, "lr": args.lr,
                      "lr_final": args.lr_final, "entropy_coeff": args.entropy,
                      "entropy_coeff_final": args.entropy_final,
                      "anneal_env_steps": args.anneal_steps or args.steps,
                      "grad_clip": args.grad_clip, "vf_loss_coeff": args.vf_coeff,
                      "gamma": args.gamma, "gae_lambda": args.gae_lambda,
                      "envs_per_runner": args.envs, "evaluation_trials": args.eval_trials,
                      "minibatch_trials": args.minibatch_trials, "num_epochs": args.epochs},
        "task_family": {"name": "bandit", "arms": args.arms, "pulls": args.pulls},
        "meta_batch_size": args.trials, "iterations": iterations, "seed": args.seed})
    trainer = RL2Trainer(spec)
    curve = []
    earlier_seconds = 0.0
    if args.resume:
        tensors = load_file(str(args.resume.with_suffix(".safetensors")))
        saved = json.loads(args.resume.with_suffix(".json").read_text())
        trainer.load_state(tensors, saved["state"])
        curve = saved["curve"]
        earlier_seconds = saved["train_seconds"]
        print(f"resumed at iteration {trainer.iteration}, {trainer.env_steps} env steps", flush=True)
    started = time.monotonic()
    last_save = started
    while trainer.iteration < iterations and time.monotonic() - started < args.minutes * 60:
        metrics = trainer.train_iteration()
        if args.save and time.monotonic() - last_save > args.save_minutes * 60:
            save_state(trainer, curve, args.save, earlier_seconds + time.monotonic() - started)
            last_save = time.monotonic()
        if trainer.iteration % args.log_every == 0:
            seconds = earlier_seconds + time.monotonic() - started
            point = {"iteration": trainer.iteration, "seconds": round(seconds, 1),
                     "steps_per_s": round(trainer.env_steps / seconds), **metrics}
            curve.append(point)
            print(json.dumps(point), flush=True)
    seconds = earlier_seconds + time.monotonic() - started
    if args.save:
        save_state(trainer, curve, args.save, seconds)
    evaluation_started = time.monotonic()
    totals, evaluation = trainer.trial_returns("test")
    evaluation.update(summarize_trial_returns("test", totals))
    result = {"pulls": args.pulls, "arms": args.arms, "paper_rl2": PAPER.get((args.pulls, args.arms)),
              "iterations": trainer.iteration, "env_steps": trainer.env_steps,
              "train_seconds": round(seconds, 1), "env_steps_per_s": round(trainer.env_steps / seconds),
              "evaluation_seconds": round(time.monotonic() - evaluation_started, 1),
              "load_average": {"before": load_before[0], "after": os.getloadavg()[0]},
              "test": evaluation, "paired_tests": paired_tests(totals),
              "per_task_returns": {name: [int(v) if float(v).is_integer() else round(float(v), 3) for v in values] for name, values in totals.items()},
              "args": {k: str(v) for k, v in vars(args).items()},
              "spec": spec.model_dump(mode="json"), "curve": curve}
    out = args.out or Path(f"benchmarks/results/rl_rl2_bandit_n{args.pulls}_k{args.arms}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "spec", "args", "per_task_returns")}))
    trainer.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
