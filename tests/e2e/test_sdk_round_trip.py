"""The SDK against a real ``metaserve serve`` (SQLite, its own local Ray): submit → wait on the
event stream → load the meta-initialization → adapt, on fresh sine tasks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from metaserve.client import Client, Event
from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow

SPEC = {"name": "sdk-round-trip", "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
        "task_family": {"name": "sine"}, "meta_batch_size": 25, "iterations": 300,
        "outer_optimizer": {"name": "adam", "lr": 0.003}, "log_every": 50, "checkpoint_every": 100,
        "evaluation": {"every": 0, "tasks": 50, "inner_steps": [1, 10]}}
FRESH_TASKS = 25


def fresh_sine_tasks(count: int, shots: int = 10, queries: int = 50):  # noqa: ANN201
    """Tasks drawn here, not by the engine's sampler: y = A·sin(x − φ) as in Finn et al. 2017."""
    generator = torch.Generator().manual_seed(12345)
    for _ in range(count):
        amplitude = 0.1 + 4.9 * torch.rand((), generator=generator)
        phase = math.pi * torch.rand((), generator=generator)
        x = 10 * torch.rand(shots + queries, 1, generator=generator) - 5
        y = amplitude * torch.sin(x - phase)
        yield x[:shots], y[:shots], x[shots:], y[shots:]


def test_submit_wait_load_adapt_lowers_the_query_mse_on_fresh_sine_tasks(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path).start()
    try:
        with Client(url=server.url, api_key=server.admin_key) as client:
            job = client.submit(SPEC)
            events: list[Event] = []
            final = client.wait(job, progress=False, on_event=events.append)
            model, recipe = client.load_meta_init(job, cache_dir=tmp_path / "download")
            support_x, support_y, query_x, _ = next(fresh_sine_tasks(1))
            remote = client.adapt_remote(job, support_x=support_x, support_y=support_y,
                                         query_x=query_x)
            stored = [(m["step"], m["name"], m["value"]) for m in client.metrics(job)]
    finally:
        server.terminate()

    assert final["status"] == "succeeded", final
    statuses = [e.data["status"] for e in events if e.kind == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    streamed = [(e.data["step"], name, value) for e in events if e.kind == "metrics"
                for name, value in e.data["values"].items()]
    assert sorted(streamed) == sorted(stored)  # every stored value streamed exactly once
    assert sorted({step for step, _, _ in streamed}) == list(range(50, 301, 50))
    assert max(e.data["iteration"] for e in events if e.kind == "progress") == 300
    assert recipe == {"adapts": "all", "algorithm": "maml", "first_order": False,
                      "inner_lr": 0.01, "inner_steps": 1}
    local = Client.adapt(model, support_x, support_y)(query_x).detach()
    torch.testing.assert_close(torch.tensor(remote["predictions"]), local)

    before, after = [], []
    for support_x, support_y, query_x, query_y in fresh_sine_tasks(FRESH_TASKS):
        before.append(torch.nn.functional.mse_loss(model(query_x), query_y).item())
        predict = Client.adapt(model, support_x, support_y, steps=10)
        after.append(torch.nn.functional.mse_loss(predict(query_x), query_y).item())
    mean_before, mean_after = sum(before) / FRESH_TASKS, sum(after) / FRESH_TASKS
    print(f"fresh sine tasks: query MSE {mean_before:.3f} before, {mean_after:.3f} after 10 steps")
    assert mean_after < 0.8 * mean_before
