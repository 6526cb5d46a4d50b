"""What the event stream says about a running job, as a progress line: :class:`Progress`
folds the events, :func:`progress_line` fits what matters into a terminal's width, and
:class:`ProgressBar` draws it with rich (imported on use)."""

from __future__ import annotations

from dataclasses import dataclass, field

from metaserve.client.sse import Event


@dataclass
class Progress:
    """What the event stream said so far about a job (what a progress bar shows)."""

    status: str = "queued"
    iteration: int = 0
    total: int | None = None
    tasks_per_s: float | None = None
    eta_s: float | None = None
    loss: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    name: str = ""
    message: str | None = None  # why a queued job waits (the queue reason)
    env_steps_per_s: float | None = None  # meta-RL jobs
    latest_return: float | None = None    # meta-RL jobs
    evaluation: tuple[str, float] | None = None  # the latest evaluation figure: (label, value)
    reconnecting: bool = False  # the event stream dropped; resuming

    def update(self, event: Event) -> None:
        self.reconnecting = False
        if event.kind == "status":
            self.status = event.data["status"]
            self.message = event.data.get("message")
        elif event.kind == "progress":
            self.iteration = int(event.data.get("iteration", self.iteration))
            self.total = event.data.get("total", self.total)
            self.tasks_per_s = event.data.get("tasks_per_s", self.tasks_per_s)
            self.env_steps_per_s = event.data.get("env_steps_per_s", self.env_steps_per_s)
            self.latest_return = event.data.get("latest_return", self.latest_return)
            self.eta_s = event.data.get("eta_s")
        elif event.kind == "metrics":
            values = event.data["values"]
            self.metrics.update(values)
            loss = values.get("train/loss_after")
            if loss is not None:
                self.loss = loss
            figure = evaluation_figure(values)
            if figure is not None:
                self.evaluation = figure


def evaluation_figure(values: dict[str, float | None]) -> tuple[str, float] | None:
    """The headline of an evaluation among ``values``: accuracy, else return, else loss after
    the most adaptation steps, on the test split, else validation; ``("val acc@5", 0.71)``."""
    import re

    for split in ("test", "val"):
        for measure, short in (("accuracy", "acc"), ("return", "return"), ("loss", "loss")):
            found = [(int(match.group(1)), name) for name in values
                     if (match := re.fullmatch(rf"{split}/{measure}_step(\d+)", name))
                     and values[name] is not None]
            if found:
                steps, name = max(found)
                return f"{split} {short}@{steps}", float(values[name])  # type: ignore[arg-type]
    return None


def _compact(number: float) -> str:
    """``1234.5`` → ``1.2k``, ``15230`` → ``15.2k``, ``812.4`` → ``812``."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= limit:
            return f"{number / limit:.1f}{suffix}"
    return f"{number:.0f}"


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(state: Progress, width: int) -> str:
    """What follows the bar: the queue reason while queued, "reconnecting" while the stream
    is resumed, else the latest evaluation figure, loss, an RL job's return, env steps/s (or
    tasks/s) and ETA — as many as fit in ``width`` characters, in that order of importance."""
    if state.reconnecting:
        head = f"{state.status}, reconnecting..."
    elif state.status == "queued":
        head = f"queued: {state.message}" if state.message else "queued"
    else:
        head = "" if state.status == "running" else state.status
    if state.reconnecting or state.status == "queued":
        return head if len(head) <= width else head[:max(0, width - 1)] + "…"
    parts: list[tuple[int, str]] = []  # (importance: lower first, text), in display order
    if head:
        parts.append((0, head))
    if state.loss is not None:
        parts.append((2, f"loss {state.loss:.3g}"))
    if state.latest_return is not None:
        parts.append((1, f"return {state.latest_return:.3g}"))
    if state.evaluation is not None:
        parts.append((1, f"{state.evaluation[0]} {state.evaluation[1]:.3g}"))
    if state.env_steps_per_s is not None:
        parts.append((3, f"{_compact(state.env_steps_per_s)} steps/s"))
    elif state.tasks_per_s is not None:
        parts.append((3, f"{_compact(state.tasks_per_s)} tasks/s"))
    if state.status == "running" and state.eta_s is not None:
        parts.append((4, f"ETA {_eta(state.eta_s)}"))
    kept: set[int] = set()
    used = 0
    for index in sorted(range(len(parts)), key=lambda i: parts[i][0]):
        cost = len(parts[index][1]) + (2 if kept else 0)
        if used + cost <= width:
            kept.add(index)
            used += cost
    return "  ".join(text for index, (_, text) in enumerate(parts) if index in kept)


class ProgressBar:
    """A rich progress line on stderr fed by :class:`Progress` updates: the job's name, a bar
    over its meta-iterations and :func:`progress_line`, within the terminal's width (80
    columns too)."""

    NAME_WIDTH = 14
    BAR_WIDTH = 10

    def __init__(self, job_id: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as RichProgress

        from rich.console import Console

        # On stderr: stdout keeps what a script reads (the id of `submit -q --wait`).
        self._progress = RichProgress(
            TextColumn("{task.description}"), BarColumn(bar_width=self.BAR_WIDTH),
            MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), transient=False,
            console=Console(stderr=True))
        self._task = self._progress.add_task(job_id[-8:], total=None, detail="")
        self._progress.start()

    def show(self, state: Progress) -> None:
        from rich.markup import escape

        name = state.name or ""
        name = name if len(name) <= self.NAME_WIDTH else name[:self.NAME_WIDTH - 1] + "…"
        done = f"{state.iteration}/{state.total}" if state.total else "0/?"
        width = self._progress.console.width - len(name) - self.BAR_WIDTH - len(done) - 4
        self._progress.update(
            self._task, total=state.total, completed=state.iteration,
            description=escape(name), detail=escape(progress_line(state, max(10, width))))

    def stop(self) -> None:
        self._progress.stop()
