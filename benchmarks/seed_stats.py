"""Statistics over seeds for the benchmarks' summaries: each seed is one observation (its mean
over its test tasks), so the spread is what a rerun with a new seed would move."""

from __future__ import annotations

import math
from collections.abc import Sequence


def t_interval(values: Sequence[float]) -> dict:
    """Mean ± the 95 % t-interval half-width over ``values`` (one per seed), and the values."""
    from scipy import stats  # noqa: PLC0415

    values = [float(value) for value in values]
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
    half = float(stats.t.ppf(0.975, len(values) - 1) * spread / math.sqrt(len(values)))
    return {"mean": mean, "ci95": half, "per_seed": values}


def paired_over_seeds(first: Sequence[float], second: Sequence[float]) -> dict:
    """``first − second`` seed by seed: its t-interval and the paired t-test's two-sided p."""
    from scipy import stats  # noqa: PLC0415

    differences = [float(a) - float(b) for a, b in zip(first, second, strict=True)]
    return {**t_interval(differences),
            "p_two_sided": float(stats.ttest_1samp(differences, 0.0).pvalue)}
