"""What one inner-loop worker does per meta-iteration, on a GPU and on one CPU thread, same run.

conv4 (64 filters), 5-way 1-shot (15 query) on the built-in glyphs family, meta-batch 32,
second-order MAML with 1 inner step: ``Trainer.step`` is exactly what ``InnerLoopWorker`` runs
(``run_segment``) for a one-worker job, with ``device="cuda"`` when the job asks for
``gpus_per_worker > 0`` and one torch thread per CPU worker otherwise.

    python benchmarks/gpu_worker.py [--cpu-iterations 5] [--gpu-iterations 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from metaserve.workers.engine import Trainer  # noqa: E402

SPEC = {
    "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1},
    "task_family": {"name": "glyphs", "ways": 5, "support_shots": 1, "query_shots": 15},
    "model": {"name": "conv4", "filters": 64},
    "meta_batch_size": 32,
}


def tasks_per_second(device: str, iterations: int) -> float:
    trainer = Trainer(SPEC, device=device)
    state = trainer.init_state()
    for _ in range(2):
        state, _ = trainer.step(state)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        state, _ = trainer.step(state)
    if device == "cuda":
        torch.cuda.synchronize()
    return iterations * SPEC["meta_batch_size"] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-iterations", type=int, default=5)
    parser.add_argument("--gpu-iterations", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"spec": SPEC, "torch": torch.__version__}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
        report["gpu_tasks_per_s"] = round(tasks_per_second("cuda", args.gpu_iterations), 1)
        report["gpu_peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    report["cpu_1_thread_tasks_per_s"] = round(tasks_per_second("cpu", args.cpu_iterations), 1)
    if "gpu_tasks_per_s" in report:
        report["gpu_over_cpu"] = round(report["gpu_tasks_per_s"] / report["cpu_1_thread_tasks_per_s"], 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
