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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray
from safetensors.torch import load_file, save_file

PAPER = {(10, 5): 6.7, (10, 10): 6.7, (100, 5): 78.7}


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
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from metaserve.workers.rl.rl2 import RL2Trainer
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
    evaluation = trainer.evaluate("test")
    result = {"pulls": args.pulls, "arms": args.arms, "paper_rl2": PAPER.get((args.pulls, args.arms)),
              "iterations": trainer.iteration, "env_steps": trainer.env_steps,
              "train_seconds": round(seconds, 1), "env_steps_per_s": round(trainer.env_steps / seconds),
              "evaluation_seconds": round(time.monotonic() - evaluation_started, 1),
              "test": evaluation, "args": {k: str(v) for k, v in vars(args).items()},
              "spec": spec.model_dump(mode="json"), "curve": curve}
    out = args.out or Path(f"benchmarks/results/rl_rl2_bandit_n{args.pulls}_k{args.arms}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "spec", "args")}))
    trainer.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
