"""``metaserve metrics --plot``: a job's metric series as a figure, one panel per kind of
quantity (matplotlib, imported on use)."""

from __future__ import annotations

import re
from pathlib import Path


COUNTER = re.compile(r"(^|/)(tasks|env_steps|steps|episodes|line_search_steps|workers)$"
                     r"|_per_s(econd)?$")
"""Series that count or rate work (tasks, env steps, throughput): never plotted as curves."""


PANELS = (("train_loss", "meta-training loss", "loss"),
          ("eval_loss", "evaluation loss / MSE (held-out tasks)", "loss"),
          ("accuracy", "evaluation accuracy (held-out tasks)", "accuracy"),
          ("returns", "returns (RL)", "return"),
          ("train_other", "meta-training: other", "value"))


def metric_panel(name: str) -> str | None:
    """Which panel of :func:`plot_metrics` a series goes on (None: not plotted): loss,
    accuracy and returns never share an axis."""
    if name.endswith("_ci95") or COUNTER.search(name):
        return None
    split, _, measure = name.rpartition("/")
    if "return" in measure:
        return "returns"
    if "accuracy" in measure:
        return "accuracy"
    if "loss" in measure or "mse" in measure:
        return "train_loss" if split == "train" else "eval_loss"
    return "train_other" if split == "train" else None


def plot_metrics(series: dict[str, list[tuple[int, float | None]]], path: Path, title: str) -> None:
    """One panel per kind of quantity (:data:`PANELS`): training loss, evaluation loss or MSE
    and accuracy (after k adaptation steps, with 95% intervals), RL returns; counters and
    rates are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped: dict[str, list[str]] = {}
    for name in sorted(series):
        panel = metric_panel(name)
        if panel is not None and any(value is not None for _, value in series[name]):
            grouped.setdefault(panel, []).append(name)
    panels = [panel for panel in PANELS if panel[0] in grouped] or [PANELS[0]]
    figure, axes_list = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2),
                                     squeeze=False)
    for axes, (panel, heading, unit) in zip(axes_list[0], panels):
        for name in grouped.get(panel, []):
            steps = [step for step, value in series[name] if value is not None]
            ys = [value for _, value in series[name] if value is not None]
            interval = dict(series.get(f"{name}_ci95", []))
            if interval:
                errors = [interval.get(step) or 0.0 for step in steps]
                axes.errorbar(steps, ys, yerr=errors, marker="o", capsize=3, label=name)
            else:
                axes.plot(steps, ys, label=name)
        axes.set_title(heading)
        axes.set_xlabel("meta-iteration")
        axes.set_ylabel(unit)
        if axes.has_data():
            axes.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
