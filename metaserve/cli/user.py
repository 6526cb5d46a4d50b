"""The user's commands: ``metaserve login``, ``submit``, ``list``, ``status``, ``metrics``,
``wait``, ``logs``, ``cancel``, ``fetch`` and ``datasets upload|list|show|delete`` talk to a
server through :mod:`metaserve.client`; ``metaserve train`` runs a job in-process with the
engine (:mod:`metaserve.workers.cli`), no server. An error is one line on stderr and exit code
1, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from metaserve.cli.common import (ClientErrors, JobArgument, OutputFormat, OutputOption, connect, fail,
                                  print_json, printable)
from metaserve.cli.metric_plots import plot_metrics

datasets_app = typer.Typer(help="Your uploaded datasets.", no_args_is_help=True)


def train(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("runs/job"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override: key.path=value.")] = None,
) -> None:
    """Run a job in-process, without the server (the engine of workers/)."""
    from pydantic import ValidationError

    from metaserve.client import load_spec_document
    from metaserve.workers.cli import train as run_training
    from metaserve.workers.spec import JobSpec

    with ClientErrors():  # unreadable file, invalid YAML, a bad --set: one line each
        document = load_spec_document(spec, set_ or [])
    try:
        JobSpec.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in found['loc']) or 'spec'}: "
                             f"{found['msg']}" for found in error.errors())
        raise fail(f"invalid job spec {spec}: {problems}") from None
    run_training(spec=spec, out=out, set_=set_ or [])


def login(
    url: Annotated[Optional[str], typer.Option(help="Server URL (default: METASERVE_URL, "
                                               "else http://127.0.0.1:8000).")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="API key (default: METASERVE_API_KEY, "
                                                   "else asked for).")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="Read the API key from this file "
                                                         "(e.g. .metaserve/admin.key).")] = None,
) -> None:
    """Check the URL and API key against the server and save them in the config file."""
    import os

    from metaserve.client import DEFAULT_URL, Client, write_config

    with ClientErrors():
        url = url or os.environ.get("METASERVE_URL") or DEFAULT_URL
        if api_key_file is not None:
            api_key = api_key_file.read_text().strip()
        api_key = api_key or os.environ.get("METASERVE_API_KEY") or typer.prompt(
            "API key", hide_input=True)
        with Client(url=url, api_key=api_key) as client:
            client.list(limit=1)
        path = write_config(url=url, api_key=api_key)
    typer.echo(f"logged in to {url}; saved in {path}")


def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override: key.path=value.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job with a progress bar until "
                                       "it finishes; exit 1 unless it succeeds.")] = False,
    idempotency_key: Annotated[Optional[str], typer.Option(help="Makes a retried submit safe.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the job id, for "
                                        "JOB=$(metaserve submit -q ...); with --wait, once the "
                                        "job succeeded (the progress bar goes to stderr when "
                                        "that is a terminal).")] = False,
) -> None:
    """Submit a job; prints its id (and, with --wait, follows it to the end)."""
    with ClientErrors(), connect() as client:
        job = client.submit(spec, overrides=set_ or [], idempotency_key=idempotency_key)
        if not quiet:
            typer.echo(printable(f"submitted {job['id']} ({job['name']})"))
        if wait:
            _follow(client, job, quiet=quiet)
        elif quiet:
            typer.echo(printable(job["id"]))


def _follow(client, job: dict, *, quiet: bool = False) -> None:  # noqa: ANN001
    """Follow ``job`` to its end with a progress bar on stderr (quiet: only when stderr is a
    terminal, so a script's log gets no bar frames); exit 1 unless it succeeded."""
    import sys

    try:
        final = client.wait(job, progress=not quiet or sys.stderr.isatty())
    except KeyboardInterrupt:
        job_id = printable(job["id"])
        typer.echo(f"\nstopped following {job_id}; the job goes on. Re-attach with: "
                   f"metaserve wait {job_id}   (its log: metaserve logs -f {job_id}; "
                   f"cancel it: metaserve cancel {job_id})", err=True)
        raise typer.Exit(130) from None
    line = f"{final['id']} {final['status']}"
    if final["status"] != "succeeded":
        raise fail(f"{line}: {final['error'] or final['message'] or ''}".rstrip(": "))
    typer.echo(printable(final["id"] if quiet else line))


def list_command(
    status: Annotated[Optional[str], typer.Option(
        help="Only jobs in this status (or a comma list: queued,running).")] = None,
    name: Annotated[Optional[str], typer.Option(
        help="Only jobs whose name contains this, in any case.")] = None,
    sort: Annotated[str, typer.Option(
        help="created_at, name, status, updated_at, duration, metric:NAME (its latest value) "
             "or param:SPEC.PATH (e.g. param:algorithm.inner_lr).")] = "created_at",
    order: Annotated[str, typer.Option(help="asc or desc.")] = "desc",
    all_trials: Annotated[bool, typer.Option(
        "--all-trials", help="List sweep trials too (by default a sweep's trials are folded "
                             "under its driver job; see metaserve sweep trials).")] = False,
    limit: Annotated[int, typer.Option(help="At most this many jobs.", min=1)] = 20,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Your jobs, newest first (or --sort), as a table (or --output json); says how many
    more there are."""
    from rich.console import Console

    with ClientErrors(), connect() as client:
        page = client.list_page(status=status, limit=limit, name=name, sort=sort, order=order,
                                trials="show" if all_trials else None)
    found = page["data"]
    if output is OutputFormat.json:
        print_json(found)
    else:
        console = Console()
        console.print(jobs_table(found, console.width))
    more = page["total"] - len(found)
    if more > 0:  # on stderr: stdout stays the table (or the JSON) alone
        typer.echo(f"{len(found)} of {page['total']} jobs shown; {more} more: "
                   f"--limit {page['total']} lists them all", err=True)


def jobs_table(found: list[dict], width: int):  # noqa: ANN201 - a rich Table
    """The jobs as a table that reads in ``width`` columns (80: names up to 19 characters
    whole): every column but the name at its full width (a status, an id are never cut), the
    name cut with an ellipsis to what is left."""
    from datetime import datetime, timezone

    from rich import box
    from rich.table import Table
    from rich.text import Text

    now = datetime.now(timezone.utc)
    rows = []
    for job in found:
        progress = job.get("progress") or {}
        done = f"{progress['iteration']}/{progress['total']}" if "iteration" in progress else "-"
        if job.get("trial_count") is not None:  # a sweep's driver: its trials folded under it
            done = f"{job['trial_count']} trials"
        rows.append([printable(cell) for cell in (
            job["name"], job.get("outcome") or job["status"], done, job["attempt"], _age(job["created_at"], now),
            job["id"])])
    columns = (("status", "left"), ("progress", "right"), ("try", "right"), ("age", "right"),
               ("id", "left"))
    widths = [max([len(header), *(len(row[index]) for row in rows)])
              for index, (header, _) in enumerate(columns, start=1)]
    gap = 2  # one space of padding, one of the (blank) column divider
    names = max([4, *(len(row[0]) for row in rows)])
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0))
    table.add_column("name", overflow="ellipsis", no_wrap=True,
                     width=max(12, min(names, width - sum(widths) - gap * len(widths) - 1)))
    for (header, justify), column_width in zip(columns, widths):
        table.add_column(header, no_wrap=True, justify=justify,  # type: ignore[arg-type]
                         width=column_width)
    for row in rows:  # Text, not str: no rich markup in a server-supplied name
        table.add_row(*(Text(cell) for cell in row))
    return table


def _age(created_at: str, now) -> str:  # noqa: ANN001
    """``45s``, ``12m``, ``5h``, ``3d`` (``kubectl get``'s AGE)."""
    from datetime import datetime, timezone

    try:
        created = datetime.fromisoformat(str(created_at).replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    seconds = max(0, int((now - created).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def status(job: JobArgument, output: OutputOption = OutputFormat.table) -> None:
    """One job: status, attempt, progress, message and error, its timestamps, duration and
    status history (or --output json)."""
    with ClientErrors(), connect() as client:
        found = client.get(job)
    if output is OutputFormat.json:
        print_json(found)
        return
    progress = found.get("progress") or {}
    lines = [("id", found["id"]), ("name", found["name"]), ("status", found["status"]),
             ("attempt", f"{found['attempt']} of {found['max_attempts']}")]
    if found.get("interruptions"):  # handbacks that were no fault of the job's (not attempts)
        lines.append(("interruptions", found["interruptions"]))
    if "iteration" in progress and found["status"] in ("queued", "running", "cancelling"):
        lines.append(("progress", f"{progress['iteration']}/{progress.get('total')} iterations, "
                                  f"{progress.get('tasks_per_s')} tasks/s"))
    elif "iteration" in progress:  # ended: no rate or ETA that no longer moves
        lines.append(("progress", f"{progress['iteration']}/{progress.get('total')} iterations"))
    lines += [(key, found[key]) for key in ("message", "error") if found.get(key)]
    lines += [(key, _when(found[key])) for key in ("created_at", "started_at", "finished_at")
              if found.get(key)]
    if found.get("duration_s") is not None:
        running = "" if found.get("finished_at") else " so far"
        lines.append(("duration", f"{format_duration(found['duration_s'])}{running}"))
    if found.get("trial_count") is not None:
        lines.append(("trials", f"{found['trial_count']} (metaserve sweep trials "
                                f"{found['driver_of_sweep']})"))
    for key, value in lines:
        typer.echo(f"{key + ':':<13}{printable(value)}")
    history = found.get("status_history") or []
    if history:
        typer.echo("history:")
        for event in history:
            said = event.get("error") or event.get("message")
            typer.echo(printable(f"  {_when(event['time'])}  {event['status']:<10} "
                                 f"attempt {event['attempt']}" + (f": {said}" if said else "")))


def _when(stamp: str) -> str:
    """An API timestamp as ``2026-12-06 04:17:14 UTC`` (seconds, no fraction)."""
    return str(stamp).replace("T", " ")[:19] + " UTC"


def format_duration(seconds: float) -> str:
    """``42s``, ``3m 07s``, ``2h 05m``, ``3d 04h``."""
    whole = int(round(seconds))
    if whole < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def metrics(
    job: JobArgument,
    plot: Annotated[Optional[Path], typer.Option(help="Write a figure of the loss and "
                                                 "evaluation curves (PNG, SVG, PDF).")] = None,
) -> None:
    """The latest value of each metric series; --plot draws every series over the steps."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    with ClientErrors(), connect() as client:
        points = client.metrics(job)
        if not points:
            raise fail(f"job {job} has no metrics yet")
        series: dict[str, list[tuple[int, float | None]]] = {}
        for point in points:
            series.setdefault(point["name"], []).append((point["step"], point["value"]))
        table = Table("metric", "step", "value")
        for name in sorted(series):
            step, value = series[name][-1]
            table.add_row(Text(printable(name)), str(step),
                          "-" if value is None else f"{value:.4g}")
        Console().print(table)
        if plot is not None:
            plot_metrics(series, plot, title=f"job {job}")
            typer.echo(f"wrote {plot}")


def wait(
    job: JobArgument,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the id once the "
                                        "job succeeded (the progress bar only when stderr is a "
                                        "terminal).")] = False,
) -> None:
    """Follow a job (again) with a progress bar until it ends; exit 0 if it succeeded, else
    1 with its error. Ctrl-C stops following, not the job."""
    with ClientErrors(), connect() as client:
        _follow(client, client.get(job), quiet=quiet)


def format_log_record(record: dict) -> str:
    """``HH:MM:SS LEVEL source: message`` (a traceback's lines follow, indented as sent)."""
    stamp = str(record.get("time", ""))[11:19]
    return (f"{stamp} {str(record.get('level', '')):<7} {record.get('source', '')}: "
            f"{record.get('message', '')}")


def logs(
    job: JobArgument,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new records "
                                         "until the job ends.")] = False,
) -> None:
    """The job's log: its driver's and inner-loop workers' records and tracebacks, and the
    dispatcher's lines about its attempts."""
    with ClientErrors(), connect() as client:
        records = client.follow_logs(job) if follow else client.logs(job)
        try:
            for record in records:
                # printable per line: a traceback keeps its lines, control characters escaped
                typer.echo("\n".join(printable(line)
                                      for line in format_log_record(record).split("\n")))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def cancel(job: JobArgument) -> None:
    """Cancel a job: a queued one at once, a running one as soon as its runner stops."""
    with ClientErrors(), connect() as client:
        found = client.cancel(job)
    typer.echo(printable(f"{found['id']} {found['status']}"))


def fetch(
    job: JobArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to download into.")],
    all_: Annotated[bool, typer.Option("--all", help="Every artifact, checkpoints included.")] = False,
) -> None:
    """Download the job's final artifacts: its meta-initialization (meta_init.*) or, for a
    meta-RL job, its meta-policy (meta_policy.*); says which and how to load it."""
    from metaserve.client import ARTIFACT_FILES, LOADERS

    with ClientErrors(), connect() as client:
        names = None if all_ else tuple(client.final_artifacts(job))
        if names == ():
            found = client.get(job)
            status = printable(found.get("outcome") or found["status"])
            if found.get("outcome") is None:  # still queued or running: they may come
                raise fail(f"job {printable(job)} has no final artifacts yet (status: {status})")
            said = found.get("error") or found.get("message")
            raise fail(f"job {printable(job)} {status} without final artifacts"
                       + (f": {printable(said)}" if said else ""))
        directory = client.download(job, out, names=names)
    listed = set(names) if names is not None else {path.name for path in Path(out).iterdir()}
    kinds = [kind for kind, files in ARTIFACT_FILES.items() if set(files) <= listed]
    loads = f"; load it with Client().{LOADERS[kinds[0]]}({str(directory)!r})" if kinds else ""
    typer.echo(f"downloaded {printable(', '.join(names or ('every artifact',)))} to "
               f"{printable(str(directory))}{printable(loads)}")


def _dataset_line(dataset: dict) -> str:
    if dataset.get("kind") == "table":
        meta = dataset.get("meta") or {}
        return (f"{dataset['id']}  {dataset['name']}  {dataset['format']}  {meta.get('rows', '?'):,} rows"
                f" of {len(meta.get('columns', []))} columns  {dataset['bytes']:,} bytes")
    shape = "×".join(str(n) for n in dataset["shape"])
    return (f"{dataset['id']}  {dataset['name']}  {dataset['format']}  {dataset['classes']} classes"
            f"  {dataset['images']} images of {shape}  {dataset['bytes']:,} bytes")


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(help="An .npz (images, labels), a .zip/.tar of an "
                                         "ImageFolder or Omniglot tree, or a CSV or Parquet table.")],
    name: Annotated[Optional[str], typer.Option(help="Default: the file name.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the dataset's id, for "
                                        "DATA=$(metaserve datasets upload -q ...); no progress bar.")] = False,
) -> None:
    """Upload a dataset; prints its id (name it in a spec as task_family.dataset)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with ClientErrors(), connect() as client:
        bar = Progress("[bold]upload", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       disable=not progress or quiet)
        with bar:
            task = bar.add_task("upload", total=path.stat().st_size)
            dataset = client.upload_dataset(
                path, name=name, progress=lambda sent, total: bar.update(task, completed=sent))
    typer.echo(printable(dataset["id"] if quiet else _dataset_line(dataset)))


@datasets_app.command("list")
def datasets_list() -> None:
    """Your datasets, newest first."""
    with ClientErrors(), connect() as client:
        for dataset in client.datasets():
            typer.echo(printable(_dataset_line(dataset)))


@datasets_app.command("show")
def datasets_show(dataset_id: Annotated[str, typer.Argument(metavar="DATASET")]) -> None:
    """One dataset, as JSON."""
    import json

    with ClientErrors(), connect() as client:
        document = client.dataset(dataset_id)
    for line in json.dumps(document, indent=2, ensure_ascii=False).splitlines():
        typer.echo(printable(line))


@datasets_app.command("delete")
def datasets_delete(dataset_id: Annotated[str, typer.Argument(metavar="DATASET")]) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    with ClientErrors(), connect() as client:
        client.delete_dataset(dataset_id)
    typer.echo(printable(f"deleted {dataset_id}"))
