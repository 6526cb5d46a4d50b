"""``metaserve sweep submit|list|status|trials|cancel|fetch``: hyperparameter sweeps from the shell
(docs/SWEEPS.md), through :mod:`metaserve.client`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from metaserve.cli.common import ClientErrors, connect, fail, printable

sweep_app = typer.Typer(help="Hyperparameter sweeps (Ray Tune): each trial is a job.",
                        no_args_is_help=True)
SweepArgument = Annotated[str, typer.Argument(help="Sweep id (as printed by submit).",
                                              metavar="SWEEP")]
TERMINAL = ("succeeded", "failed", "cancelled")


def _value(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_table(sweep: dict[str, Any], trials: list[dict[str, Any]]):  # noqa: ANN201
    """The leaderboard as a rich table: rank, trial, job, status, iteration, metric (the
    selection's, validation), its held-out test counterpart, config."""
    from rich.table import Table

    metric = sweep["config"]["scheduler"]["metric"]
    test_metric = next((trial.get("test_metric") for trial in trials), None)
    table = Table(title=printable(f"{sweep['name']} ({sweep['id']}): {sweep['status']}, "
                                  f"{metric} ({sweep['config']['scheduler']['mode']})"))
    for column in ("#", "trial", "job", "status", "iteration", metric,
                   *([f"held-out {test_metric}"] if test_metric else []),
                   *sweep["config"]["space"]):
        table.add_column(printable(column))
    for rank, trial in enumerate(trials, 1):
        iteration = trial.get("iteration") or trial.get("step")
        table.add_row(str(rank), printable(trial["trial_id"] or ""), trial["job_id"],
                      trial.get("outcome") or trial["status"], _value(iteration), _value(trial["value"]),
                      *([_value(trial.get("test_value"))] if test_metric else []),
                      *(printable(_value(trial["config"].get(path)))
                        for path in sweep["config"]["space"]))
    return table


def _held_out(trial: dict[str, Any]) -> str:
    """The trial's held-out test score as the status line shows it beside the selection's
    value, or why an ended trial has none (a running one has none yet)."""
    if trial.get("test_value") is not None:
        return f", held-out {trial['test_metric']} {_value(trial['test_value'])}"
    if trial.get("test_note") and trial.get("status") not in ("queued", "running", "cancelling"):
        return f", no held-out test score ({trial['test_note']})"
    return ""


def status_line(sweep: dict[str, Any]) -> str:
    counts = ", ".join(f"{count} {status}" for status, count in sorted(sweep["trials"].items()))
    best = sweep.get("best")
    shown = (f"; best {best['metric']} {_value(best['value'])}{_held_out(best)} "
             f"(job {best['job_id']})" if best else "")
    return (f"{sweep['id']}  {sweep['name']}  {sweep['status']}  trials: "
            f"{counts or 'none started'} of {sweep['config']['trials']}{shown}")


@sweep_app.command("submit")
def submit(
    sweep: Annotated[Path, typer.Argument(help="Sweep document (YAML or JSON): spec, space, "
                                          "search, scheduler, num_samples.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override: key.path=value "
                                                      "(e.g. num_samples=8).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show a live table of the trials until the "
                                       "sweep ends; exit 1 unless it succeeds.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the sweep id.")] = False,
) -> None:
    """Queue a sweep; prints its id."""
    with ClientErrors(), connect() as client:
        created = client.submit_sweep(sweep, overrides=set_)
        if not quiet:
            typer.echo(printable(status_line(created)))
        else:
            typer.echo(created["id"])
        if wait:
            final = _follow(client, created["id"])
            if final["status"] != "succeeded":
                raise fail(f"sweep {final['id']} {final['status']}: "
                           f"{final.get('error') or final.get('message') or ''}")


def _follow(client, sweep_id: str) -> dict[str, Any]:  # noqa: ANN001
    from rich.live import Live

    with Live(refresh_per_second=2, transient=False) as live:
        def update(current: dict[str, Any]) -> None:
            live.update(trials_table(current, client.sweep_trials(sweep_id)))

        try:
            return client.wait_sweep(sweep_id, on_update=update)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


@sweep_app.command("list")
def list_sweeps(
    limit: Annotated[int, typer.Option(help="At most this many sweeps.", min=1, max=100)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="The sweeps as JSON.")] = False,
) -> None:
    """Your sweeps, newest first, one line each as `sweep status` prints it: status, trials
    by status, the best so far."""
    with ClientErrors(), connect() as client:
        found = client.sweeps(limit=limit)
    if as_json:
        for line in json.dumps(found, indent=2, ensure_ascii=False).splitlines():
            typer.echo(printable(line))
        return
    for sweep in found:
        typer.echo(printable(status_line(sweep)))
    if not found:
        typer.echo("no sweeps yet: metaserve sweep submit SWEEP.yaml", err=True)


@sweep_app.command("status")
def status(sweep_id: SweepArgument,
           as_json: Annotated[bool, typer.Option("--json", help="The whole sweep as JSON.")] = False
           ) -> None:
    """The sweep's status, trial counts and best trial so far."""
    with ClientErrors(), connect() as client:
        current = client.sweep(sweep_id)
    if as_json:
        for line in json.dumps(current, indent=2, ensure_ascii=False).splitlines():
            typer.echo(printable(line))
    else:
        typer.echo(printable(status_line(current)))


@sweep_app.command("trials")
def trials(sweep_id: SweepArgument,
           as_json: Annotated[bool, typer.Option("--json", help="The leaderboard as JSON.")] = False
           ) -> None:
    """The leaderboard: every started trial, best first, with its job id and config."""
    from rich.console import Console

    with ClientErrors(), connect() as client:
        current, board = client.sweep(sweep_id), client.sweep_trials(sweep_id)
    if as_json:
        for line in json.dumps(board, indent=2, ensure_ascii=False).splitlines():
            typer.echo(printable(line))
        return
    Console(width=200).print(trials_table(current, board))


@sweep_app.command("cancel")
def cancel(sweep_id: SweepArgument) -> None:
    """Stop the sweep and every running trial."""
    with ClientErrors(), connect() as client:
        typer.echo(printable(status_line(client.cancel_sweep(sweep_id))))


@sweep_app.command("fetch")
def fetch(sweep_id: SweepArgument,
          out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write to.")] = Path(".")
          ) -> None:
    """Download the best trial's meta_init.* and sweep.json (the leaderboard)."""
    with ClientErrors(), connect() as client:
        directory = client.download_sweep(sweep_id, out)
    typer.echo(printable(f"best trial's meta-initialization and sweep.json in {directory}"))
