"""The machine a benchmark ran on, for its raw JSON: the one place that reads the CPU's model
(runs on an AMD EPYC and an Intel Xeon VM of the same size differ by up to 2× in wall time)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo (e.g. "AMD EPYC"), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
