"""Held-out-entity error on task-grouped tables, through the real service: does MAML adapt to an
entity it never saw better than the pooled baseline, the unadapted meta-initialization, and a
model trained on the entity alone?

For each configuration, a live ``metaserve serve`` on loopback (a fresh embedded default in
a temporary directory) gets the table by ``POST /v1/datasets`` (CSV or Parquet, as a user
uploads it), trains, per seed, a MAML job and a ``finetune`` job (the pooled baseline: one model
trained on every training entity's rows, fine-tuned per entity; same network, iterations,
meta-batch, outer optimizer and fine-tuning recipe), and then, for every test entity (split by
entity, never by row: the jobs never saw them), sends that entity's raw rows to
``POST /v1/jobs/{id}/adapt`` — support rows with their targets, query rows — and scores the
predictions it returns in the target's own units:

- ``maml``: MAML's meta-initialization after its ``inner_steps`` SGD steps on the support rows;
- ``finetune``: the pooled model after the same steps at the same step size
  (``finetune_more``: 10x and 50x as many, in case the baseline just needs more steps);
- ``meta_init`` / ``pooled``: either model with 0 steps (not adapted);
- ``scratch``: the same network from a fresh initialization trained on the entity's support
  rows alone (Adam, lr 0.01, full batch; in this process, not a service feature: the number of
  steps is chosen on the validation entities from 10/30/100/300/1000, and every count is
  recorded), scaled with the same training-entity statistics.

An entity's task: a seeded random choice of ``support`` rows, every other row as the query
(time series: the ``support`` rows before a cut and the ``query`` rows after it, the cut at
the end of the series; with lags, the query rows' lags are the true previous targets, as the
engine's evaluation does). Error per entity = MSE over its query rows in the target's units;
the table reports, per method, the mean over (seed, entity) with a 95 % CI over entities (the
per-entity errors averaged over seeds first: the same entities recur in every seed), and paired
tests (t-test and Wilcoxon over entities) of MAML against each other method.

Configurations (``--configs``):

- ``generated-csv`` / ``generated-parquet``: 200 entities × 40 rows; each entity its own
  nonlinear function of 3 features, y = a·sin(x1 + φ) + b·x2·x3 + c + noise (a, φ, b, c drawn
  per entity), uploaded as CSV and as Parquet (the same table: the errors must agree);
- ``generated-timeseries``: the same entities with a time column and drift: y_t = f(x_t) + d·t/40
  + AR(1) noise (ρ per entity), ``time_column: t``, ``lags: 2``: support = past, query = future;
- ``mathachieve``: the real panel (examples/export_panel_csv.py: nlme's MathAchieve, 160
  schools, students' maths achievement from SES, sex, minority and the school's mean SES).

    .venv/bin/python benchmarks/tabular.py --configs generated-csv generated-parquet \\
        generated-timeseries mathachieve --seeds 0 1 2
    .venv/bin/python benchmarks/tabular.py --configs mathachieve --iterations 20 --seeds 0 \\
        --out /tmp/smoke     # a smoke run

Raw JSON per configuration: ``benchmarks/results/tabular_<config>.json`` (per entity, per
seed, per method; the command, machine from /proc/cpuinfo, load averages, seeds, times); the
Markdown table is printed and written beside it as ``tabular_<config>.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
Z_95 = 1.959963984540054
SCRATCH_STEPS = (10, 30, 100, 300, 1000)
SCRATCH_LR = 0.01
STARTUP_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- the tables


def generated_panel(*, entities: int = 200, rows: int = 40, seed: int = 0,
                    time_series: bool = False) -> pd.DataFrame:
    """Each entity its own nonlinear function of 3 features (see the module docstring)."""
    rng = np.random.default_rng(seed)
    frames = []
    for entity in range(entities):
        amplitude, phase = rng.uniform(0.5, 2.0), rng.uniform(0.0, math.pi)
        interaction, offset = rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)
        x = rng.uniform(-2.0, 2.0, size=(rows, 3))
        y = amplitude * np.sin(x[:, 0] + phase) + interaction * x[:, 1] * x[:, 2] + offset
        frame = {"entity": f"e{entity:03d}", "x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2]}
        if time_series:
            drift, rho = rng.uniform(-1.0, 1.0), rng.uniform(0.3, 0.9)
            noise = np.zeros(rows)
            shocks = rng.normal(0.0, 0.3, size=rows)
            for t in range(rows):
                noise[t] = (rho * noise[t - 1] if t else 0.0) + shocks[t]
            frame["t"] = np.arange(rows)
            y = y + drift * np.arange(rows) / rows + noise
        else:
            y = y + rng.normal(0.0, 0.1, size=rows)
        frame["y"] = y
        frames.append(pd.DataFrame(frame))
    table = pd.concat(frames, ignore_index=True)
    if time_series:  # rows arrive in any order: the time column orders them
        table = table.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return table


def mathachieve_panel() -> pd.DataFrame:
    """The table examples/export_panel_csv.py writes."""
    location = ROOT / "examples" / "export_panel_csv.py"
    module_spec = importlib.util.spec_from_file_location("export_panel_csv", location)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.mathachieve_table()


@dataclass(frozen=True)
class Config:
    name: str
    table: Any  # () -> DataFrame
    file_format: str  # csv | parquet
    task_column: str
    target: str
    features: list[str]
    time_column: str | None = None
    lags: int = 0
    support: int = 10
    query: int = 10  # rows per training task's query set; evaluation queries every other row
    split: tuple[float, float, float] = (0.6, 0.1, 0.3)
    on_invalid: str = "refuse"
    hidden: tuple[int, ...] = (40, 40)
    iterations: int = 2000
    meta_batch_size: int = 25
    inner_lr: float = 0.1
    inner_steps: int = 5
    outer_lr: float = 0.001
    notes: dict[str, Any] = field(default_factory=dict)


GENERATED = dict(task_column="entity", target="y", features=["x1", "x2", "x3"])
CONFIGS = {
    "generated-csv": Config("generated-csv", generated_panel, "csv", **GENERATED),
    "generated-parquet": Config("generated-parquet", generated_panel, "parquet", **GENERATED),
    "generated-timeseries": Config("generated-timeseries",
                                   lambda: generated_panel(time_series=True), "csv",
                                   time_column="t", lags=2, **GENERATED),
    "mathachieve": Config("mathachieve", mathachieve_panel, "csv", task_column="school",
                          target="math_ach", features=["ses", "female", "minority", "mean_ses"],
                          on_invalid="skip"),
}


def write_table(table: pd.DataFrame, directory: Path, config: Config) -> Path:
    path = directory / f"{config.name}.{config.file_format}"
    if config.file_format == "csv":
        table.to_csv(path, index=False)
    else:
        table.to_parquet(path, index=False)
    return path


def job_spec(config: Config, algorithm: str, dataset_id: str, seed: int, iterations: int) -> dict:
    family = {"name": "tabular", "dataset": dataset_id, "task_column": config.task_column,
              "target": config.target, "features": config.features,
              "support_shots": config.support, "query_shots": config.query,
              "split": list(config.split), "on_invalid": config.on_invalid}
    if config.time_column:
        family.update(time_column=config.time_column, lags=config.lags)
    return {"name": f"tabular-{config.name}-{algorithm}-seed{seed}",
            "algorithm": {"name": algorithm, "inner_lr": config.inner_lr,
                          "inner_steps": config.inner_steps},
            "task_family": family, "model": {"name": "mlp", "hidden": list(config.hidden)},
            "meta_batch_size": config.meta_batch_size, "iterations": iterations,
            "outer_optimizer": {"name": "adam", "lr": config.outer_lr},
            "evaluation": {"every": 0, "tasks": 300, "inner_steps": [config.inner_steps]},
            "checkpoint_every": iterations, "log_every": max(1, iterations // 20), "seed": seed}


# --------------------------------------------------------------------------- the held-out tasks


@dataclass
class EntityTask:
    """One held-out entity's task: raw rows for the service, scaled rows for the scratch
    model, and the query targets in the target's units."""

    entity: Any
    support_rows: dict[str, list]
    query_rows: dict[str, list]
    support_x: torch.Tensor  # scaled, as the family feeds the network
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: np.ndarray  # target units, [m, 1]


def _raw_entity_rows(table: pd.DataFrame, config: Config, entity: Any) -> pd.DataFrame:
    """The entity's rows as the family orders them: by time, else in table order."""
    rows = table[table[config.task_column].astype(str) == str(entity)]
    if config.time_column:
        rows = rows.sort_values(config.time_column, kind="stable")
    return rows


def _columns(frame: pd.DataFrame, names: list[str]) -> dict[str, list]:
    return {name: frame[name].tolist() for name in names}


def held_out_tasks(family, table: pd.DataFrame, config: Config, split: str, seed: int
                   ) -> list[EntityTask]:
    """One task per entity of ``split`` (see the module docstring); entities with too few rows
    are left out, as the family leaves them out."""
    rows = family.splits[split]
    target_mean, target_std = family.target_mean[0], family.target_std[0]
    timed = [config.time_column] if config.time_column else []
    tasks = []
    for index, entity in enumerate(rows.entity_ids):
        start, end = int(rows.offsets[index]), int(rows.offsets[index + 1])
        scaled_x, scaled_y = rows.x[start:end], rows.y[start:end]
        raw = _raw_entity_rows(table, config, entity)
        if len(raw) - config.lags != end - start:
            raise AssertionError(f"entity {entity}: {len(raw)} raw rows, {end - start} in the family")
        usable = end - start
        if config.time_column:
            if usable < config.support + config.query:
                continue
            cut = usable - config.query
            support = np.arange(cut - config.support, cut)
            query = np.arange(cut, usable)
            # raw rows: the support's lags come from the rows just before it
            raw_support = raw.iloc[cut - config.support:cut + config.lags]
            raw_query = raw.iloc[cut + config.lags:usable + config.lags]
            query_names = config.features + timed + [config.target]  # true lags: one step ahead
        else:
            if usable < config.support + 1:
                continue
            generator = np.random.default_rng([seed, index])
            order = generator.permutation(usable)
            support, query = np.sort(order[:config.support]), np.sort(order[config.support:])
            raw_support, raw_query = raw.iloc[support], raw.iloc[query]
            query_names = config.features
        tasks.append(EntityTask(
            entity=entity,
            support_rows=_columns(raw_support, config.features + timed + [config.target]),
            query_rows=_columns(raw_query, query_names),
            support_x=scaled_x[support], support_y=scaled_y[support], query_x=scaled_x[query],
            query_y=(scaled_y[query].double().numpy() * target_std + target_mean)))
        np.testing.assert_allclose(tasks[-1].query_y[:, 0], raw_query[config.target].to_numpy(),
                                   rtol=1e-5, atol=1e-5 * abs(target_std))
    return tasks


def local_family(table: pd.DataFrame, config: Config, spec: dict, directory: Path):
    """The engine's own family over the same table (its scaled rows feed the scratch model;
    its scalers must equal the artifact's recipe)."""
    from metaserve.workers.spec import TabularSpec
    from metaserve.workers.tasks.table_format import write_canonical_table
    from metaserve.workers.tasks.tabular import TabularFamily

    directory.mkdir(parents=True, exist_ok=True)
    columns = {name: (table[name].astype(str).to_numpy(dtype=object) if table[name].dtype == object
                      else table[name].to_numpy()) for name in table.columns}
    write_canonical_table(directory, columns, source_format=config.file_format)
    return TabularFamily(TabularSpec.model_validate(spec["task_family"]), directory=directory)


# --------------------------------------------------------------------------- the methods


def adapt_remote(http: httpx.Client, job_id: str, task: EntityTask, steps: int) -> np.ndarray:
    """``POST /v1/jobs/{id}/adapt`` with the entity's raw rows: query predictions in the
    target's units, ``[m, 1]``."""
    response = http.post(f"/v1/jobs/{job_id}/adapt",
                         json={"support": task.support_rows, "query": task.query_rows,
                               "steps": steps})
    if response.status_code != 200:
        raise RuntimeError(f"adapt {job_id}: {response.status_code} {response.text}")
    return np.asarray(response.json()["predictions"], dtype=np.float64).reshape(-1, 1)


def scratch_errors(tasks: list[EntityTask], hidden: tuple[int, ...], seed: int, target_std: float,
                   target_mean: float) -> list[dict[int, float]]:
    """Per task, the network from a fresh initialization (its own, seeded by ``seed`` and the
    task's position) trained on the task's support rows alone: query MSE in target units after
    each count of :data:`SCRATCH_STEPS` full-batch Adam steps. All tasks' models train at once,
    stacked on a task axis: their losses are summed, and as Adam is elementwise each
    model's update is the one it would get alone."""
    from metaserve.workers.networks import build_model
    from metaserve.workers.spec import MLPSpec

    if not tasks:
        return []
    model = build_model(MLPSpec(hidden=list(hidden)), (tasks[0].support_x.shape[1],), 1, 0)
    inits = [model.init_params(torch.Generator().manual_seed(seed * 1_000_003 + index))
             for index in range(len(tasks))]
    params = {name: torch.nn.Parameter(torch.stack([init[name] for init in inits])) for name in inits[0]}
    support_x = torch.stack([task.support_x for task in tasks])
    support_y = torch.stack([task.support_y for task in tasks])
    layers = [(f"layers.{i}.weight", f"layers.{i}.bias") for i in range(len(hidden))]
    layers.append(("head.weight", "head.bias"))

    def batched(stacked: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The ReLU MLP of every task at once: ``x [E, n, in]`` through per-task weights
        (one batched matrix product per layer; the same function as ``model``)."""
        h = x
        for index, (weight, bias) in enumerate(layers):
            h = torch.baddbmm(stacked[bias].unsqueeze(1), h, stacked[weight].transpose(1, 2))
            if index < len(layers) - 1:
                h = torch.relu(h)
        return h
    optimizer = torch.optim.Adam(params.values(), lr=SCRATCH_LR)
    errors: list[dict[int, float]] = [{} for _ in tasks]
    done = 0
    for steps in SCRATCH_STEPS:
        for _ in range(steps - done):
            optimizer.zero_grad()
            ((batched(params, support_x) - support_y) ** 2).mean(dim=(1, 2)).sum().backward()
            optimizer.step()
        done = steps
        with torch.no_grad():
            for index, task in enumerate(tasks):
                own = {name: value[index] for name, value in params.items()}
                predictions = model(own, task.query_x).double().numpy() * target_std + target_mean
                errors[index][steps] = float(((predictions - task.query_y) ** 2).mean())
    return errors


def mse(predictions: np.ndarray, targets: np.ndarray) -> float:
    return float(((predictions - targets) ** 2).mean())


# --------------------------------------------------------------------------- statistics


def mean_ci(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        return float(array.mean()), float("nan")
    return float(array.mean()), Z_95 * float(array.std(ddof=1)) / math.sqrt(len(array))


def paired(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    """Paired tests over entities of ``first - second`` (negative: ``first`` is better)."""
    from scipy import stats

    difference = first - second
    mean, ci = mean_ci(difference.tolist())
    return {"mean_difference": mean, "ci95": ci, "entities": int(len(difference)),
            "t_test_p": float(stats.ttest_rel(first, second).pvalue),
            "wilcoxon_p": float(stats.wilcoxon(first, second).pvalue),
            "first_better_entities": int((difference < 0).sum())}


def summarize(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per method: mean ± CI over entities of the per-entity error averaged over seeds, each
    seed's mean, and paired tests of MAML against every other method."""
    seeds = sorted(per_seed)
    methods = list(next(iter(per_seed.values())))
    entities = sorted(set.intersection(*(set(per_seed[s][methods[0]]) for s in seeds)), key=str)
    averaged = {method: np.array([np.mean([per_seed[s][method][e] for s in seeds]) for e in entities])
                for method in methods}
    summary: dict[str, Any] = {"entities": len(entities), "seeds": seeds, "methods": {}}
    for method in methods:
        mean, ci = mean_ci(averaged[method].tolist())
        summary["methods"][method] = {
            "mse_mean": mean, "mse_ci95": ci,
            "per_seed_mean": [float(np.mean(list(per_seed[s][method].values()))) for s in seeds]}
    summary["maml_vs"] = {method: paired(averaged["maml"], averaged[method])
                          for method in methods if method != "maml"}
    return summary


# --------------------------------------------------------------------------- the server


class Server:
    """A fresh ``metaserve serve`` (embedded default) in a temporary directory, on loopback."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        executable = Path(sys.executable).with_name("metaserve")
        env = {k: v for k, v in os.environ.items() if not k.startswith("METASERVE_")}
        env.update(METASERVE_PORT=str(self.port), METASERVE_RAY_NUM_CPUS=str(os.cpu_count() or 2))
        log = (self.workdir / "server.log").open("w")
        self.process = subprocess.Popen([str(executable), "serve"], cwd=self.workdir, env=env,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"server did not start: {self.workdir / 'server.log'}")
            time.sleep(0.5)
        self.key = (self.workdir / ".metaserve" / "admin.key").read_text().strip()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- one configuration


def machine() -> dict[str, Any]:
    from machine import cpu_model  # noqa: PLC0415 (benchmarks/, beside this script)

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}


def run_config(config: Config, server: Server, seeds: list[int], iterations: int,
               workdir: Path) -> dict[str, Any]:
    from metaserve import Client

    started, load_before = time.time(), os.getloadavg()
    table = config.table()
    path = write_table(table, workdir, config)
    client = Client(server.url, server.key)
    http = httpx.Client(base_url=server.url, timeout=120,
                        headers={"Authorization": f"Bearer {server.key}"})
    dataset = client.upload_dataset(path, name=path.name)
    jobs: dict[int, dict[str, str]] = {}
    for seed in seeds:
        jobs[seed] = {algorithm: client.submit(job_spec(config, algorithm, dataset["id"], seed,
                                                        iterations))["id"]
                      for algorithm in ("maml", "finetune")}
    finished = {job_id: client.wait(job_id, progress=False)
                for pair in jobs.values() for job_id in pair.values()}
    failed = {job_id: job.get("error") for job_id, job in finished.items()
              if job["status"] != "succeeded"}
    if failed:
        raise RuntimeError(f"{config.name}: jobs failed: {failed}")
    trained = time.time()

    spec = job_spec(config, "maml", dataset["id"], seeds[0], iterations)
    family = local_family(table, config, spec, workdir / f"{config.name}-table")
    target_mean, target_std = float(family.target_mean[0]), float(family.target_std[0])
    k = config.inner_steps
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    scratch_all: dict[int, dict[str, dict[int, float]]] = {}
    engine_evaluation: dict[int, dict[str, dict[str, float]]] = {}
    for seed in seeds:
        # the recipe the service adapts with is the family's (scalers from training entities)
        recipe = json.loads(client_download_recipe(client, jobs[seed]["maml"], workdir))
        np.testing.assert_allclose(recipe["target_mean"], family.target_mean, rtol=1e-9)
        np.testing.assert_allclose(recipe["feature_std"], family.feature_std, rtol=1e-9)
        scratch_val = scratch_errors(held_out_tasks(family, table, config, "val", seed),
                                     config.hidden, seed, target_std, target_mean)
        best_steps = min(SCRATCH_STEPS, key=lambda s: np.mean([errors[s] for errors in scratch_val]))
        errors: dict[str, dict[str, float]] = {name: {} for name in (
            "maml", "finetune", "meta_init", "pooled", "scratch",
            f"finetune_{10 * k}_steps", f"finetune_{50 * k}_steps")}
        scratch_all[seed] = {}
        test_tasks = held_out_tasks(family, table, config, "test", seed)
        scratch_test = scratch_errors(test_tasks, config.hidden, seed, target_std, target_mean)
        for task, scratch in zip(test_tasks, scratch_test):
            entity = str(task.entity)
            maml, pooled = jobs[seed]["maml"], jobs[seed]["finetune"]
            errors["maml"][entity] = mse(adapt_remote(http, maml, task, k), task.query_y)
            errors["meta_init"][entity] = mse(adapt_remote(http, maml, task, 0), task.query_y)
            errors["finetune"][entity] = mse(adapt_remote(http, pooled, task, k), task.query_y)
            errors["pooled"][entity] = mse(adapt_remote(http, pooled, task, 0), task.query_y)
            for more in (10 * k, 50 * k):
                if more <= 100:  # the service's cap on steps
                    errors[f"finetune_{more}_steps"][entity] = mse(
                        adapt_remote(http, pooled, task, more), task.query_y)
            scratch_all[seed][entity] = scratch
            errors["scratch"][entity] = scratch[best_steps]
        per_seed[seed] = {name: values for name, values in errors.items() if values}
        engine_evaluation[seed] = {  # the engine's own test evaluation (standardized units)
            algorithm: {point["name"]: point["value"] for point in client.metrics(job_id)
                        if point["name"].startswith("test/")}
            for algorithm, job_id in jobs[seed].items()}
        scratch_all[seed]["chosen_steps"] = best_steps  # type: ignore[assignment]
    return {
        "config": {k_: v for k_, v in config.__dict__.items() if k_ != "table"},
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine(), "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()), "seeds": seeds, "iterations": iterations,
        "dataset": {key: dataset.get(key) for key in ("id", "name", "size_bytes", "meta") if key in dataset},
        "jobs": jobs, "train_seconds": trained - started, "total_seconds": time.time() - started,
        "summary": summarize(per_seed), "per_seed_entity_mse": per_seed,
        "scratch_mse_by_steps": scratch_all, "engine_test_evaluation": engine_evaluation,
    }


def client_download_recipe(client, job_id: str, workdir: Path) -> str:
    """The data part of the job's recipe (features, targets, the training entities' scalers)."""
    directory = client.download(job_id, workdir / f"artifact-{job_id}")
    document = json.loads((Path(directory) / "meta_init.json").read_text())
    return json.dumps(document["recipe"]["data"])


def method_label(method: str, steps: int) -> str:
    labels = {"maml": f"MAML, {steps} steps", "finetune": f"pooled + fine-tune, {steps} steps",
              "meta_init": "MAML init, not adapted", "pooled": "pooled, not adapted",
              "scratch": "per-entity model from scratch"}
    if method in labels:
        return labels[method]
    return f"pooled + fine-tune, {method.split('_')[1]} steps"  # finetune_<n>_steps


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method (what docs/templates/TABULAR.md renders): its error and, except for
    MAML itself, MAML's paired difference to it."""
    summary, steps = result["summary"], result["config"]["inner_steps"]
    rows = []
    for method, values in summary["methods"].items():
        row = {"method": method, "label": method_label(method, steps),
               "mse_mean": values["mse_mean"], "mse_ci95": values["mse_ci95"],
               "per_seed": " / ".join(f"{value:.3g}" for value in values["per_seed_mean"]),
               "entities": summary["entities"]}
        versus = summary["maml_vs"].get(method)
        if versus:
            row.update(maml_minus=versus["mean_difference"], maml_minus_ci95=versus["ci95"],
                       t_test_p=versus["t_test_p"], wilcoxon_p=versus["wilcoxon_p"],
                       maml_better=f"{versus['first_better_entities']}/{versus['entities']}")
        rows.append(row)
    return rows


def with_table(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the fields the generated page reads: rows, hardware, date."""
    loads = result["load_average_before"][0], result["load_average_after"][0]
    return {**result, "rows": table_rows(result),
            "hardware": f"CPU-{result['machine']['cores']} ({result['machine']['cpu']}), load "
                        f"{min(loads):.1f}–{max(loads):.1f} (1 min, before/after)",
            "date": result.get("date") or time.strftime("%Y-%m-%d", time.gmtime())}


def table_markdown(result: dict[str, Any]) -> str:
    lines = [f"| method | held-out MSE (mean ± 95 % CI over {result['summary']['entities']} "
             f"entities) | per seed | MAML minus it (95 % CI) | paired t p | Wilcoxon p |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        lines.append(
            f"| {row['label']} | {row['mse_mean']:.4g} ± {row['mse_ci95']:.2g} | {row['per_seed']} | "
            + (f"{row['maml_minus']:+.3g} ± {row['maml_minus_ci95']:.2g} | {row['t_test_p']:.2g} | "
               f"{row['wilcoxon_p']:.2g} |" if "maml_minus" in row else "— | — | — |"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=None,
                        help="meta-iterations of every job (default: the configuration's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # a SIGTERM (timeout, kill) unwinds like Ctrl-C, so the server and its Ray are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(1)  # this process only scores; the jobs train in the server's workers
    workdir = Path(tempfile.mkdtemp(prefix="metaserve-tabular-"))
    try:
        with Server(workdir) as server:
            for name in args.configs:
                config = CONFIGS[name]
                result = with_table(run_config(config, server, args.seeds,
                                               args.iterations or config.iterations, workdir))
                (args.out / f"tabular_{name}.json").write_text(json.dumps(result, indent=1, default=str))
                markdown = table_markdown(result)
                (args.out / f"tabular_{name}.md").write_text(markdown)
                print(f"## {name} ({result['total_seconds']:.0f} s)\n{markdown}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
