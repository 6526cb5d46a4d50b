"""ASHA against the full grid: examples/sweep_sine_maml.yaml (16 configurations of sine MAML)
submitted through REST twice per seed, once as written (ASHA on val/loss_step1) and once with
``scheduler: fifo`` (every configuration to full length), in one run of a server with its
dispatcher and a local Ray (in this process, SQLite, a temporary data directory).

Reports per seed and as mean ± 95 % CI over seeds (a seed is the spec's ``seed`` and the
shuffled grid's order, ``search.seed``, in both sweeps): the best finished
trial's validation MSE after one step in each sweep, their ratio (target: ASHA within 5 % of the
grid's best, i.e. ratio ≤ 1.05), and the iterations each sweep trained, summed over its trials
(target: ASHA ≤ 40 % of the grid's). The JSON is written after every seed.

    python benchmarks/sweep_asha.py --seeds 0 1 2 --json benchmarks/results/sweep_asha.json
    # the same in Tune's grid order (the ablation of search.shuffle):
    python benchmarks/sweep_asha.py --seeds 0 --tune-order --json /tmp/tune_order.json
    # a quick check of the script (minutes, not a result):
    python benchmarks/sweep_asha.py --iterations 60 --every 20 --tasks 20 --json /tmp/tiny.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sweep_sine_maml.yaml"
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95 % t-interval (None for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, T_95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def run_sweep(client, headers: dict[str, str], document: dict, timeout_s: float) -> dict:  # noqa: ANN001
    started, load = time.monotonic(), os.getloadavg()
    created = client.post("/v1/sweeps", json=document, headers=headers)
    assert created.status_code == 201, created.text
    sweep_id = created.json()["id"]
    while True:
        sweep = client.get(f"/v1/sweeps/{sweep_id}", headers=headers).json()
        if sweep["status"] in ("succeeded", "failed", "cancelled"):
            break
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"sweep {sweep_id} still {sweep['status']} after {timeout_s} s")
        time.sleep(2.0)
    trials = client.get(f"/v1/sweeps/{sweep_id}/trials", headers=headers).json()["data"]
    metric = document["scheduler"]["metric"]
    for trial in trials:  # its validation curve: every evaluation window, to replay rungs
        page = client.get(f"/v1/jobs/{trial['job_id']}/metrics", headers=headers,
                          params={"name": metric, "limit": 1000}).json()
        trial["curve"] = [[m["step"], m["value"]] for m in page["data"]]
    finished = [t for t in trials if t["status"] == "succeeded" and t["value"] is not None]
    # Iterations trained per trial: its progress, or the step of its last evaluation (a
    # stopped trial ends at the window that stopped it).
    iterations = sum(max(t["iteration"] or 0, t["step"] or 0) for t in trials)
    stopped_at: dict[str, int] = {}
    for t in trials:
        if t["status"] != "succeeded":
            key = str(max(t["iteration"] or 0, t["step"] or 0))
            stopped_at[key] = stopped_at.get(key, 0) + 1
    return {"sweep_id": sweep_id, "status": sweep["status"], "error": sweep["error"],
            "seconds": round(time.monotonic() - started, 1),
            "load_average": {"start": load, "end": os.getloadavg()}, "trials": len(trials),
            "stopped_at": stopped_at,
            "finished": len(finished), "iterations": iterations,
            "best_val_mse": min((t["value"] for t in finished), default=None),
            "best_config": min(finished, key=lambda t: t["value"])["config"] if finished else None,
            "leaderboard": trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--iterations", type=int, help="Override spec.iterations (tiny checks).")
    parser.add_argument("--every", type=int, help="Override evaluation.every and grace_period.")
    parser.add_argument("--tasks", type=int, help="Override evaluation.tasks.")
    parser.add_argument("--concurrency", type=int, help="Override max_concurrent_trials.")
    parser.add_argument("--reduction-factor", type=float, help="Override ASHA's η.")
    parser.add_argument("--tune-order", action="store_true",
                        help="Run the grid in Tune's order (search.shuffle false).")
    parser.add_argument("--timeout-s", type=float, default=6 * 3600)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from metaserve.api.app import create_app
    from metaserve.service import auth
    from metaserve.service.db import make_engine, session_factory
    from metaserve.service.migrate import upgrade
    from metaserve.service.settings import Settings

    base = yaml.safe_load(EXAMPLE.read_text())
    if args.iterations:
        base["spec"]["iterations"] = args.iterations
        base["spec"]["checkpoint_every"] = max(1, args.iterations // 4)
        base["spec"]["log_every"] = max(1, args.iterations // 20)
    if args.every:
        base["spec"]["evaluation"]["every"] = base["scheduler"]["grace_period"] = args.every
    if args.tasks:
        base["spec"]["evaluation"]["tasks"] = args.tasks
    if args.concurrency:
        base["max_concurrent_trials"] = args.concurrency
    if args.reduction_factor:
        base["scheduler"]["reduction_factor"] = args.reduction_factor
    if args.tune_order:
        base["search"]["shuffle"] = False
    runs: list[dict] = []

    def write() -> None:
        ratios = [r["best_ratio"] for r in runs if r.get("best_ratio") is not None]
        fractions = [r["iteration_fraction"] for r in runs
                     if r.get("iteration_fraction") is not None]
        summary = {}
        for name, values in (("best_ratio", ratios), ("iteration_fraction", fractions)):
            if values:
                mean, ci = mean_ci(values)
                summary[name] = {"mean": mean, "ci95": ci, "values": values}
        document = {"benchmark": "sweep_asha", "spec": base, "seeds": [r["seed"] for r in runs],
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "python": platform.python_version()},
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "summary": summary, "runs": runs}
        print(json.dumps(summary, indent=2), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(document, indent=2))

    with tempfile.TemporaryDirectory() as data:
        url = f"sqlite:///{data}/metaserve.db"
        upgrade(url)
        with session_factory(make_engine(url))() as session:
            _, key = auth.create_key(session=session, name="bench", is_admin=True)
        settings = Settings(database_url=url, data_dir=Path(data),
                            artifact_root=Path(data) / "artifacts")
        headers = {"Authorization": f"Bearer {key}"}
        with TestClient(create_app(settings)) as client:
            for seed in args.seeds:
                asha = {**base, "name": f"asha-seed{seed}",
                        "spec": {**base["spec"], "seed": seed},
                        "search": {**base.get("search", {}), "seed": seed}}
                grid = {**asha, "name": f"grid-seed{seed}",
                        "scheduler": {**base["scheduler"], "name": "fifo"}}
                result = {"seed": seed, "asha": run_sweep(client, headers, asha, args.timeout_s),
                          "grid": run_sweep(client, headers, grid, args.timeout_s)}
                a, g = result["asha"], result["grid"]
                if a["best_val_mse"] is not None and g["best_val_mse"] is not None:
                    result["best_ratio"] = a["best_val_mse"] / g["best_val_mse"]
                result["iteration_fraction"] = a["iterations"] / g["iterations"] if g["iterations"] else None
                runs.append(result)
                print(json.dumps({key: value for key, value in result.items()
                                  if key not in ("asha", "grid")}), flush=True)
                write()


if __name__ == "__main__":
    main()
