"""The few-shot meta-step beside plain training of the same network (issue #29's yardstick).

One process, one torch thread, interleaved rounds, best of N: a supervised training step of the
backbone (the same network as ``torch.nn`` modules: conv → batch norm → ReLU → max-pool blocks
and a linear head, Adam, cross-entropy) on as many images as one meta-step sees, beside the
engine's own meta-step (:meth:`Trainer.step`: task sampling and distortion included, as a job
runs it) of ProtoNets, ANIL, FOMAML and MAML (1 and 5 inner steps) on typefaces 5-way 1-shot
15 queries, meta-batch 4 (4 × 5 × 16 = 320 images). Printed and saved per method: images/s,
the ratio to supervised, the FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode``)
and the FLOP-normalized ratio (images/s × FLOPs per image, relative to supervised: a MAML step
does its inner loop and second-order work on top of the supervised work, so this ratio
compares achieved FLOP/s). Also the final evaluation of 600 tasks (served at every step count
of the method's evaluation, transductive after the last for batch norm, as a job evaluates)
beside training 600 tasks (600 / meta-batch steps) timed right after it in the same process,
``--eval-rounds`` times, best of each.

    .venv/bin/python benchmarks/fewshot_speed.py --out benchmarks/results/fewshot_speed_before.json
    .venv/bin/python benchmarks/fewshot_speed.py --before benchmarks/results/fewshot_speed_before.json
    .venv/bin/python benchmarks/fewshot_speed.py --backbones conv4 --rounds 2 --steps 2  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
WAYS, SHOTS, QUERIES, META_BATCH = 5, 1, 15, 4
IMAGES = META_BATCH * WAYS * (SHOTS + QUERIES)
METHODS = {
    "protonet": ({"name": "protonet"}, [0]),
    "anil": ({"name": "anil", "inner_lr": 0.4, "inner_steps": 1}, [1, 3]),
    "fomaml": ({"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "first_order": True}, [1, 3]),
    "maml1": ({"name": "maml", "inner_lr": 0.4, "inner_steps": 1}, [1, 3]),
    "maml5": ({"name": "maml", "inner_lr": 0.4, "inner_steps": 5}, [1, 3, 5]),
}


def model_spec(backbone: str, args: argparse.Namespace) -> dict:
    if backbone == "conv4":
        return {"name": "conv4", "filters": 64, "norm": args.norm}
    return {"name": "resnet12", "widths": args.resnet_widths, "norm": args.norm}


def job_spec(method: str, backbone: str, args: argparse.Namespace) -> dict:
    algorithm, steps = METHODS[method]
    return {"name": f"speed-{method}-{backbone}", "algorithm": algorithm,
            "task_family": {"name": "typefaces", "ways": WAYS, "support_shots": SHOTS,
                            "query_shots": QUERIES},
            "model": model_spec(backbone, args), "meta_batch_size": META_BATCH, "iterations": 1000,
            "outer_optimizer": {"name": "adam", "lr": 0.001},
            "evaluation": {"every": 0, "tasks": args.eval_tasks, "inner_steps": steps},
            "checkpoint_every": 1000, "log_every": 10, "seed": 0}


class Supervised(nn.Module):
    """The backbone as plain ``torch.nn`` modules (batch norm in training mode), the activation
    after the max-pool as in the engine (same values, less work)."""

    def __init__(self, backbone: str, args: argparse.Namespace, classes: int):
        super().__init__()
        if backbone == "conv4":
            layers, channels = [], 1
            for _ in range(4):
                # pool before the activation, as the engine computes it (the same function)
                layers += [nn.Conv2d(channels, 64, 3, padding=1), nn.BatchNorm2d(64), nn.MaxPool2d(2), nn.ReLU()]
                channels = 64
            self.body = nn.Sequential(*layers, nn.Flatten())
            features = 64
        else:
            self.body = ResNet12Body(args.resnet_widths)
            features = args.resnet_widths[-1]
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ResNet12Body(nn.Module):
    def __init__(self, widths: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList()
        channels = 1
        for width in widths:
            convs = nn.ModuleList([nn.Conv2d(c, width, 3, padding=1, bias=False) for c in (channels, width, width)])
            norms = nn.ModuleList([nn.BatchNorm2d(width) for _ in range(3)])
            shortcut = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width))
            self.blocks.append(nn.ModuleDict({"convs": convs, "norms": norms, "shortcut": shortcut}))
            channels = width

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            out = h
            for index, (conv, norm) in enumerate(zip(block["convs"], block["norms"])):
                out = norm(conv(out))
                if index < 2:
                    out = F.leaky_relu(out, 0.1)
            h = F.leaky_relu(F.max_pool2d(out + block["shortcut"](h), 2), 0.1)
        return h.mean(dim=(2, 3))


def supervised_step(backbone: str, args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor):
    torch.manual_seed(0)
    model = Supervised(backbone, args, WAYS)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def plain_trainer(spec: dict):
    """A trainer on the plain path the fast paths replaced (same bits, or within 1e-6 in
    float64 for the norm: tests/workers/engine/test_fewshot_step.py): the batch norm written
    out (no fused kernel), tasks sampled inline, ProtoNets and ANIL by the
    generic objective (features of the support set computed apart, a forward of their own for
    the metrics before adaptation), evaluation chunks of DEFAULT_EVALUATION_CHUNK tasks."""
    from torch.func import vmap

    from metaserve.workers.algorithms.base import _TASK_AXES, Algorithm
    from metaserve.workers.engine.trainer import DEFAULT_EVALUATION_CHUNK, Trainer, TaskPrefetcher

    class PlainTrainer(Trainer):
        evaluation_chunk = DEFAULT_EVALUATION_CHUNK

    trainer = PlainTrainer(spec)
    trainer.prefetcher = TaskPrefetcher(trainer._sample, background=False)
    algorithm = trainer.algorithm
    algorithm.fused_norm = False  # the batch norm written out, as before the fused kernel
    if algorithm.name in ("protonet", "anil"):
        algorithm.task_objective = lambda *tensors: Algorithm.task_objective(algorithm, *tensors)
        algorithm._batched_objective = vmap(algorithm.task_objective, in_dims=_TASK_AXES)
    if algorithm.name == "anil":
        algorithm._curve = lambda served, transductive: Algorithm._curve(algorithm, served, transductive)
    if algorithm.name == "protonet":
        def curve(served_steps, transductive_steps):  # noqa: ANN001, ANN202 - ProtoNets' evaluation before
            def task_curve(params, support_x, support_y, query_x, query_y):  # noqa: ANN001, ANN202
                curves = []
                for mode, steps in ((False, served_steps), (True, transductive_steps)):
                    if steps:
                        prototypes = algorithm.adapt(params, support_x, support_y, 0)
                        output = algorithm.query_predict(params, prototypes, support_x, query_x, mode)
                        loss, hits = algorithm.loss_fn(output, query_y), (output.argmax(-1) == query_y).float().mean()
                        curves.append((loss.expand(len(steps)), hits.expand(len(steps))))
                return tuple(curves)
            return vmap(task_curve, in_dims=_TASK_AXES)
        algorithm._curve = curve

    def passes_as_before(params, *batch, served_steps, transductive_steps=()):  # noqa: ANN001, ANN202
        """Each pass adapted apart, the transductive one at every step (the evaluation before)."""
        served = Algorithm.evaluation_passes(algorithm, params, *batch, served_steps)
        if not transductive_steps:
            return served
        loss, acc = Algorithm.evaluation_passes(algorithm, params, *batch, (), served_steps)[0]
        columns = [list(served_steps).index(step) for step in transductive_steps]
        return (*served, (loss[:, columns], acc[:, columns]))
    algorithm.evaluation_passes = passes_as_before
    return trainer


def meta_step(method: str, backbone: str, args: argparse.Namespace):
    from metaserve.workers.engine import Trainer

    plain = method.endswith("@plain")
    spec = job_spec(method.removesuffix("@plain"), backbone, args)
    trainer = plain_trainer(spec) if plain else Trainer(spec)
    holder = {"state": trainer.init_state()}

    def step() -> None:
        holder["state"], _ = trainer.step(holder["state"])

    return step, trainer, holder


def flops_of(step) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def timed(step, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - started) / count


def run_backbone(backbone: str, args: argparse.Namespace) -> dict:
    from metaserve.workers.spec import TypefacesSpec
    from metaserve.workers.tasks import build_task_family

    family = build_task_family(TypefacesSpec(ways=WAYS, support_shots=SHOTS, query_shots=QUERIES))
    batch = family.sample(seed=0, split="train", iteration=0, task_indices=range(META_BATCH))
    images = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
    labels = torch.cat([batch.support_y.flatten(), batch.query_y.flatten()])
    assert images.shape[0] == IMAGES
    steps = {"supervised": supervised_step(backbone, args, images, labels)}
    trainers = {}
    for method in args.methods:
        for variant in ([method, f"{method}@plain"] if args.plain else [method]):
            steps[variant], trainers[variant], _ = meta_step(variant, backbone, args)
    flops = {name: flops_of(step) for name, step in steps.items()}  # also the warm-up step
    best = {name: float("inf") for name in steps}
    for round_ in range(args.rounds):
        for name, step in steps.items():
            best[name] = min(best[name], timed(step, args.steps))
        print(f"[{backbone}] round {round_ + 1}/{args.rounds}: "
              + ", ".join(f"{n} {IMAGES / s:.0f}" for n, s in best.items()), file=sys.stderr, flush=True)
    base_rate = IMAGES / best["supervised"]
    rows = {}
    for name, seconds in best.items():
        rate = IMAGES / seconds
        normalized = rate * (flops[name] / flops["supervised"])
        rows[name] = {"seconds_per_step": seconds, "images_per_s": rate, "ratio": rate / base_rate,
                      "flops_per_step": flops[name], "flops_per_image": flops[name] / IMAGES,
                      "flop_normalized_ratio": normalized / base_rate}
    evaluation = {}
    for method in [m for name in args.eval_methods for m in (name, f"{name}@plain")]:
        if method not in trainers:
            continue
        trainer, step = trainers[method], steps[method]
        params = trainer.init_state().params
        trainer.evaluate(params, split="val", tasks=20)  # warm-up (transforms built)
        train_steps = max(1, args.eval_tasks // META_BATCH)
        eval_seconds, train_seconds = float("inf"), float("inf")
        for _ in range(args.eval_rounds):  # interleaved: evaluation, then training the same count
            started = time.perf_counter()
            trainer.evaluate(params, split="val", tasks=args.eval_tasks)
            eval_seconds = min(eval_seconds, time.perf_counter() - started)
            train_seconds = min(train_seconds, timed(step, train_steps) * train_steps)
        evaluation[method] = {"eval_seconds": eval_seconds, "eval_tasks": args.eval_tasks,
                              "train_seconds_same_tasks": train_seconds, "train_steps": train_steps,
                              "ratio": eval_seconds / train_seconds, "rounds": args.eval_rounds,
                              "transductive_pass": trainer.algorithm.trains_transductive}
        print(f"[{backbone}] eval {method}: {eval_seconds:.1f} s for {args.eval_tasks} tasks vs "
              f"{train_seconds:.1f} s training them", file=sys.stderr, flush=True)
    return {"methods": rows, "evaluation": evaluation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["conv4", "resnet12"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--eval-methods", nargs="*", default=["protonet", "maml1"])
    parser.add_argument("--resnet-widths", type=int, nargs=4, default=[16, 32, 64, 128])
    parser.add_argument("--norm", default="batch")
    parser.add_argument("--plain", action="store_true",
                        help="also each method on the plain path the fast paths replaced (METHOD@plain)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--eval-tasks", type=int, default=600)
    parser.add_argument("--eval-rounds", type=int, default=1,
                        help="rounds of (evaluate --eval-tasks tasks, train as many tasks), best of each")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", type=Path, default=None,
                        help="a raw JSON of this benchmark on the code before a change, embedded as `before`")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fewshot_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = {name: run_backbone(name, args) for name in args.backbones}
    for backbone, result in results.items():
        print(f"\n{backbone}: images/s (ratio to supervised; FLOP-normalized ratio)")
        for name, row in result["methods"].items():
            print(f"  {name:16s} {row['images_per_s']:7.1f}  {row['ratio']:.2f}  "
                  f"{row['flop_normalized_ratio']:.2f}  ({row['flops_per_image'] / 1e6:.1f} MFLOP/image)")
        for name, row in result["evaluation"].items():
            print(f"  eval {name}: {row['eval_seconds']:.1f} s / {args.eval_tasks} tasks vs training {row['train_seconds_same_tasks']:.1f} s"
                  f" ({row['ratio']:.2f})")
    document = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "wall_seconds": time.perf_counter() - started,
        "setting": {"ways": WAYS, "shots": SHOTS, "queries": QUERIES, "meta_batch": META_BATCH,
                    "images_per_step": IMAGES, "norm": args.norm, "resnet_widths": args.resnet_widths,
                    "rounds": args.rounds, "steps_per_round": args.steps, "statistic": "best of rounds"},
        "results": results,
    }
    if args.before is not None:
        before = json.loads(args.before.read_text())
        document["before"] = {"file": str(args.before), "command": before["command"],
                              "load_average_before": before["load_average_before"],
                              "results": before["results"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
