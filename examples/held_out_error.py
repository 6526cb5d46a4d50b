"""Print the held-out-entity error of finished ``tabular`` regression jobs, side by side: the
engine's test evaluation (tasks drawn from the test split's entities, which no job trained on),
before adaptation and after the job's fine-tuning steps, as mean squared error in the target's
own units (the engine reports it on standardized targets; the job's recipe holds the
training entities' scale) with its 95 % CI over test tasks.

    python examples/held_out_error.py JOB [JOB ...]

Reads the server and key as every client does (``metaserve login``, or METASERVE_URL and
METASERVE_API_KEY).
"""

from __future__ import annotations

import argparse

from metaserve import Client


def held_out_error(client: Client, job_id: str) -> dict:
    """The job's name, algorithm, fine-tuning steps, target, and test MSE before and after
    adaptation (mean, CI half-width) in the target's units."""
    job = client.get(job_id)
    if job["status"] != "succeeded":
        raise SystemExit(f"error: job {job_id} is {job['status']}, not succeeded")
    _, recipe = client.load_meta_init(job_id)
    data = recipe.get("data")
    if data is None or data.get("problem") != "regression":
        raise SystemExit(f"error: job {job_id} is not a tabular regression job")
    scale = data["target_std"][0] ** 2  # MSE on standardized targets × variance = MSE in units²
    steps = max(job["spec"]["evaluation"]["inner_steps"])
    latest = {point["name"]: point["value"] for point in client.metrics(job_id)
              if point["name"].startswith("test/")}  # the final test evaluation
    return {"name": job["name"], "algorithm": recipe["algorithm"], "steps": steps,
            "target": data["targets"][0],
            "before": (latest["test/loss_step0"] * scale, latest["test/loss_step0_ci95"] * scale),
            "after": (latest[f"test/loss_step{steps}"] * scale,
                      latest[f"test/loss_step{steps}_ci95"] * scale)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs", nargs="+", metavar="JOB")
    arguments = parser.parse_args(argv)
    with Client() as client:
        rows = [held_out_error(client, job_id) for job_id in arguments.jobs]
    print(f"held-out-entity MSE of {rows[0]['target']} (mean ± 95% CI over test tasks)")
    print(f"{'job':<30} {'algorithm':<10} {'not adapted':>17} {'adapted':>17}  steps")
    for row in rows:
        before, after = row["before"], row["after"]
        print(f"{row['name'][:30]:<30} {row['algorithm']:<10} {before[0]:>9.2f} ± {before[1]:<5.2f} "
              f"{after[0]:>9.2f} ± {after[1]:<5.2f}  {row['steps']}")


if __name__ == "__main__":
    main()
