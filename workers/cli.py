"""``metaserve train SPEC.yaml --out DIR [--set a.b=value]``: run a job in this process.

Shows a progress bar, appends every report to ``DIR/metrics.jsonl`` (one JSON object per line:
``{"step": n, "metrics": {...}, "time": unix seconds}``), checkpoints to ``DIR/checkpoint``
(re-running the same command resumes) and writes ``meta_init.safetensors`` + ``meta_init.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from metaserve.workers.spec import JobSpec

METRICS_FILE = "metrics.jsonl"


def apply_overrides(document: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b=value`` sets ``document["a"]["b"]`` to ``value`` parsed as YAML (numbers, lists, …)."""
    result = json.loads(json.dumps(document))
    for override in overrides:
        path, separator, raw_value = override.partition("=")
        if not separator or not path:
            raise typer.BadParameter(f"--set expects KEY.PATH=VALUE, got {override!r}", param_hint="--set")
        node = result
        keys = path.split(".")
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise typer.BadParameter(f"--set {path}: {key!r} is not a mapping", param_hint="--set")
            node = child
        node[keys[-1]] = yaml.safe_load(raw_value)
    return result


def load_spec(path: Path, overrides: list[str] | None = None) -> JobSpec:
    document = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(document, dict):
        raise typer.BadParameter(f"{path}: a job spec is a mapping", param_hint="SPEC")
    return JobSpec.model_validate(apply_overrides(document, overrides or []))


def train(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON).", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (resumed if it has a checkpoint).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a spec field: a.b=value.")] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Meta-train SPEC without the server; write metrics.jsonl and the meta-initialization (or, for
    meta-RL, the meta-policy) to OUT. Supervised jobs run in this process; meta-RL jobs on a local
    Ray started for the run (RLlib and PEARL's rollouts need one)."""
    from metaserve.workers.engine import Trainer

    try:
        job = load_spec(spec, set_)
    except ValidationError as error:
        typer.echo(f"invalid job spec {spec}:\n{error}", err=True)
        raise typer.Exit(code=2) from None
    out.mkdir(parents=True, exist_ok=True)
    with (out / METRICS_FILE).open("a") as metrics_file:
        def reporter(step: int, metrics: dict[str, float]) -> None:
            metrics_file.write(json.dumps({"step": step, "metrics": metrics, "time": time.time()}) + "\n")
            metrics_file.flush()

        if job.is_rl:
            _train_rl(job, out, reporter)
            typer.echo(f"done: {job.iterations} iterations; meta-policy in {out}")
            return
        # The threads the job's workers would hold (torch's default, every core, oversubscribes
        # a shared machine: 100 sine steps took 20-45 s on 2 threads at load 5, under 1 s on 1).
        import os

        import torch

        torch.set_num_threads(min(job.resources.torch_threads, os.cpu_count() or 1))
        state = Trainer(job, device=device).run(out, reporter=reporter, progress=progress)
    typer.echo(f"done: {state.iteration} iterations; meta-initialization in {out}")


def _train_rl(job, out: Path, reporter) -> None:  # noqa: ANN001
    import ray

    from metaserve.workers.engine.loop import RunHooks
    from metaserve.workers.local_ray import start_local_ray
    from metaserve.workers.registry import run_job

    started_here = not ray.is_initialized()
    if started_here:
        start_local_ray(log_to_driver=False, configure_logging=False)
    try:
        run_job(job, out, RunHooks(report=reporter))
    finally:
        if started_here:
            ray.shutdown()
