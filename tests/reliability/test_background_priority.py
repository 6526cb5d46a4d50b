"""The processes the API hands work to are niced, every thread of them (Linux's nice is per
thread); with ``METASERVE_CHILD_SCHEDULER=idle`` they run at ``SCHED_IDLE`` instead
(docs/notes/hostile-load-tail.md)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metaserve.service.adapt_pool import ADAPT_NICENESS, PROCESS_START_TIMEOUT_S, AdaptProcess
from metaserve.service.background import SCHEDULER_ENV

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux only")

REPORT = """
import json, os
from metaserve.service.background import run_in_background
policy = run_in_background(7)
print(json.dumps({"returned": policy, "idle": os.sched_getscheduler(0) == os.SCHED_IDLE,
                  "nice": os.getpriority(os.PRIO_PROCESS, 0)}))
"""


def run_child(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", REPORT], capture_output=True, text=True,
                         timeout=60, check=True, env={**os.environ, **env})
    return json.loads(out.stdout)


def test_a_background_process_is_niced_by_default() -> None:
    environment = {k: v for k, v in os.environ.items() if k != SCHEDULER_ENV}
    report = run_child(environment)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert report == {"returned": "nice", "idle": False, "nice": min(19, mine + 7)}


def test_the_setting_moves_it_to_sched_idle() -> None:
    report = run_child({SCHEDULER_ENV: "idle"})
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert report == {"returned": "idle", "idle": True, "nice": min(19, mine + 7)}


def thread_states(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread's (scheduling policy, nice value)."""
    return {int(task.name): (os.sched_getscheduler(int(task.name)),
                             os.getpriority(os.PRIO_PROCESS, int(task.name)))
            for task in Path(f"/proc/{pid}/task").iterdir()}


@pytest.mark.parametrize("scheduler", ["nice", "idle"])
def test_every_thread_of_an_adapt_process_runs_below_the_api(
        scheduler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if scheduler == "nice":
        monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    else:
        monkeypatch.setenv(SCHEDULER_ENV, scheduler)
    process = AdaptProcess(multiprocessing.get_context("spawn"))
    try:
        assert process._connection.poll(PROCESS_START_TIMEOUT_S), "the adapt process did not start"
        assert process._connection.recv() == "ready"  # torch imported: its threads exist
        states = thread_states(process.process.pid)
        niced = min(19, os.getpriority(os.PRIO_PROCESS, 0) + ADAPT_NICENESS)
        policy = os.SCHED_IDLE if scheduler == "idle" else os.SCHED_OTHER
        assert states and set(states.values()) == {(policy, niced)}, states
    finally:
        process.stop()


def test_the_dataset_conversion_child_runs_in_the_background() -> None:
    """The conversion's entry point makes itself a background process before it reads a
    byte of the upload (checked where it does so: the child exits before it can be seen)."""
    from metaserve.service import dataset_ingest

    source = Path(dataset_ingest.__file__).read_text()
    main = source[source.index("def main("):source.index("def convert_upload(")]
    assert "run_in_background(CHILD_NICENESS)" in main
    assert main.index("run_in_background") < main.index("convert_upload(")
