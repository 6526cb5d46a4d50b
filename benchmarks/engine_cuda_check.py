"""The engine on a CUDA device: correctness against the CPU, determinism, the in-process loop,
throughput, and the few-shot classification comparison (conv4, MAML vs ANIL, 5-way 1-/5-shot
on the built-in glyphs family).

    python benchmarks/engine_cuda_check.py --out results.json [--fewshot-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from metaserve.workers.engine import Trainer, load_meta_init

SINE = {"algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1}, "task_family": {"name": "sine"},
        "meta_batch_size": 25, "iterations": 20, "evaluation": {"every": 0, "tasks": 200, "inner_steps": [1, 10]},
        "checkpoint_every": 10, "log_every": 10}


def train(trainer: Trainer, iterations: int):
    state = trainer.init_state()
    for _ in range(iterations):
        state, metrics = trainer.step(state)
    return state


def max_difference(first: dict, second: dict) -> float:
    return max(float((first[n].cpu() - second[n].cpu()).abs().max()) for n in first)


def timed_steps(trainer: Trainer, iterations: int) -> float:
    state = trainer.init_state()
    for _ in range(3):
        state, _ = trainer.step(state)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        state, _ = trainer.step(state)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / iterations


def fewshot(algorithm: str, shots: int, seconds: float) -> dict:
    spec = {"algorithm": {"name": algorithm, "inner_lr": 0.4, "inner_steps": 1},
            "task_family": {"name": "glyphs", "ways": 5, "support_shots": shots, "query_shots": 15},
            "model": {"name": "conv4", "filters": 64, "norm": "batch"}, "meta_batch_size": 32,
            "iterations": 1_000_000, "outer_optimizer": {"name": "adam", "lr": 0.001},
            "evaluation": {"tasks": 500, "inner_steps": [1, 3, 10]}}
    trainer = Trainer(spec, device="cuda")
    state = trainer.init_state()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        state, metrics = trainer.step(state)
    train_seconds = time.perf_counter() - started
    evaluation = trainer.evaluate(state.params, split="test")
    return {"algorithm": algorithm, "shots": shots, "iterations": state.iteration,
            "train_seconds": round(train_seconds, 1), "train": metrics,
            **{k: v for k, v in evaluation.items() if "accuracy" in k}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fewshot-seconds", type=float, default=60.0)
    args = parser.parse_args()
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

    cpu = train(Trainer(SINE, device="cpu"), 20)
    cuda_first = train(Trainer(SINE, device="cuda"), 20)
    cuda_second = train(Trainer(SINE, device="cuda"), 20)
    report["sine_maml_20_steps_max_abs_diff_cpu_vs_cuda"] = max_difference(cpu.params, cuda_first.params)
    report["sine_maml_cuda_runs_bit_identical"] = max_difference(cuda_first.params, cuda_second.params) == 0.0
    for algorithm in ["reptile", "anil", "metasgd", "prompt"]:
        document = {**SINE, "algorithm": {"name": algorithm}}
        report[f"{algorithm}_20_steps_max_abs_diff_cpu_vs_cuda"] = max_difference(
            train(Trainer(document), 20).params, train(Trainer(document, device="cuda"), 20).params)

    with tempfile.TemporaryDirectory() as out:
        reports = []
        trainer = Trainer(SINE, device="cuda")
        state = trainer.run(Path(out), reporter=lambda step, metrics: reports.append(step))
        model, recipe = load_meta_init(Path(out))
        report["run_on_cuda"] = {"iterations": state.iteration, "report_steps": reports,
                                 "params_device": str(state.params["head.weight"].device),
                                 "files": sorted(p.name for p in Path(out).iterdir()), "recipe": recipe}

    report["throughput"] = {}
    for meta_batch in (25, 1000):
        for algorithm, steps in (("maml", 1), ("maml", 5)):
            document = {**SINE, "meta_batch_size": meta_batch,
                        "algorithm": {"name": algorithm, "inner_steps": steps, "inner_lr": 0.01}}
            seconds = timed_steps(Trainer(document, device="cuda"), 30)
            report["throughput"][f"{algorithm}-{steps}step-mb{meta_batch}"] = {
                "ms_per_iteration": round(seconds * 1e3, 2), "tasks_per_second": round(meta_batch / seconds)}
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)

    report["fewshot"] = []
    for shots in (1, 5):
        for algorithm in ("maml", "anil"):
            report["fewshot"].append(fewshot(algorithm, shots, args.fewshot_seconds))
            print(json.dumps(report["fewshot"][-1]), flush=True)
            args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
