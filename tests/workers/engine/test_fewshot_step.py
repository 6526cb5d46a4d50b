"""The few-shot meta-step's fast paths (issue #29) give the plain path's results.

- ProtoNets and ANIL compute their "before" metrics without another forward (ANIL: from the
  query features it has), and the features of a whole chunk of tasks by one forward without
  ``vmap`` (``interleaved_tasks``) with the fused batch norm; the plain path is
  :meth:`Algorithm.task_objective` per task under ``vmap`` (what they ran before) with the
  batch norm written out. In float64 the two stay within 1e-6 after 100 iterations (float32
  rounding, reordered, is amplified by Adam: docs/notes/fewshot-profile.md).
- Image tasks are sampled ahead in a background thread (:class:`TaskPrefetcher`): after 100
  iterations the parameters are the bits of the same meta-step on tasks sampled inline, and a
  run SIGKILLed mid-way with the prefetching on resumes to the bits of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaserve.workers.algorithms.base import Algorithm
from metaserve.workers.engine import Trainer
from metaserve.workers.engine.checkpoints import CheckpointError, load_checkpoint
from metaserve.workers.engine.state import ShardResult, TrainState
from metaserve.workers.networks import fused_batch_norm
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[3]


def few_shot_spec(algorithm: dict, norm: str, iterations: int = 100, **changes) -> dict:
    return {"name": "fewshot-step", "algorithm": algorithm,
            "task_family": {"name": "typefaces", "ways": 3, "support_shots": 1, "query_shots": 2},
            "model": {"name": "conv4", "filters": 4, "norm": norm}, "meta_batch_size": 2,
            "iterations": iterations, "outer_optimizer": {"name": "adam", "lr": 0.003},
            "evaluation": {"every": 0, "tasks": 6, "inner_steps": [1]},
            "checkpoint_every": iterations, "log_every": iterations, "seed": 5, **changes}


def plain_path(spec: dict, iterations: int, fused_norm: bool | None = None,
               dtype: torch.dtype = torch.float32, engine: bool = False) -> dict[str, torch.Tensor]:
    """``iterations`` meta-steps on tasks sampled inline, in ``dtype``: the engine's own
    meta-gradient (``engine``), else the meta-step as it was — the generic objective per task
    under ``vmap`` and a separate forward for the metrics before adaptation, the batch norm
    fused where the trainer fuses it (``fused_norm`` None) or as given (False: written out, the
    norm before the fused kernel)."""
    trainer = Trainer(spec)
    algorithm = trainer.algorithm
    if fused_norm is None:
        fused_norm = not algorithm.differentiates_norm_twice
    state = trainer.init_state()
    state = TrainState(params={name: value.to(dtype) for name, value in state.params.items()},
                       opt_state={name: value.to(dtype) if value.is_floating_point() else value
                                  for name, value in state.opt_state.items()}, iteration=0)
    for iteration in range(iterations):
        batch = trainer.family.sample(seed=trainer.spec.seed, split="train", iteration=iteration,
                                      task_indices=range(trainer.spec.meta_batch_size))
        batch = [value.to(dtype) if value.is_floating_point() else value for value in batch]
        if engine:
            grads, _ = algorithm.meta_gradient(state.params, *batch)
        else:
            leaves = {name: value.detach().requires_grad_(True) for name, value in state.params.items()}
            with torch.enable_grad(), fused_batch_norm(fused_norm):
                losses, metrics = torch.func.vmap(
                    lambda *args: Algorithm.task_objective(algorithm, *args), in_dims=(None, 0, 0, 0, 0))(
                    leaves, *batch)
                grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
            assert "loss_before" not in metrics
            grads = {name: torch.zeros_like(leaves[name]) if g is None else g for name, g in zip(leaves, grads)}
        state = trainer.apply(state, [ShardResult(grad_sum=grads, metrics={})])
    return state.params


@pytest.mark.parametrize(("algorithm", "norm"), [
    ({"name": "protonet"}, "batch"),  # transductive training: support and query apart
    ({"name": "protonet"}, "support"),  # queries beside the support set's statistics
    ({"name": "anil", "inner_lr": 0.4, "inner_steps": 2}, "instance"),  # no set statistics
])
def test_prefetching_gives_the_inline_paths_bits_after_100_iterations(algorithm, norm):
    spec = few_shot_spec(algorithm, norm)
    trainer = Trainer(spec)
    assert trainer.prefetcher._background  # image tasks: sampled ahead
    assert trainer.algorithm.interleaves()  # the chunk's features by one forward
    state = trainer.init_state()
    try:
        for _ in range(100):
            state, metrics = trainer.step(state)
    finally:
        trainer.close()
    expected = plain_path(spec, 100, engine=True)
    for name, value in expected.items():
        assert torch.equal(state.params[name], value), name
    assert {"train/loss_before", "train/accuracy_before", "train/loss_after"} <= metrics.keys()


@pytest.mark.slow  # 2 × 100 float64 iterations each
@pytest.mark.parametrize(("algorithm", "norm"), [
    ({"name": "protonet"}, "batch"),
    ({"name": "anil", "inner_lr": 0.4, "inner_steps": 2}, "batch"),
    ({"name": "anil", "inner_lr": 0.4, "inner_steps": 2}, "support"),
    ({"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "first_order": True}, "batch"),  # per task: fused only
    ({"name": "protonet"}, "support"),  # queries by the support set's statistics (addcmul form)
])
def test_the_engine_stays_within_1e_6_of_the_written_out_plain_path_after_100_iterations(algorithm, norm):
    """The fused kernel (and, for ProtoNets and ANIL, one forward of the chunk's interleaved
    tasks) computes the written-out norm's maths in another order. In float64, after 100 Adam
    iterations, every parameter that the network's output depends on is within 1e-6 of the
    written-out per-task path's, and so are the outputs. A conv bias right before a batch
    norm is not one: the norm subtracts it again, its gradient is 0 up to rounding, and Adam's
    normalized step turns that rounding into steps of ±lr (in float32 the rounding of every
    op is amplified so: docs/notes/fewshot-profile.md)."""
    spec = few_shot_spec(algorithm, norm)
    trainer = Trainer(spec)
    assert not trainer.algorithm.differentiates_norm_twice
    fused = plain_path(spec, 100, dtype=torch.float64, engine=True)
    written = plain_path(spec, 100, fused_norm=False, dtype=torch.float64)
    initial = trainer.init_state().params
    assert max(float((value - initial[name].double()).abs().max()) for name, value in written.items()) > 0.05
    for name, value in written.items():
        if not name.endswith(".conv.bias"):
            torch.testing.assert_close(fused[name], value, atol=1e-6, rtol=0, msg=name)
    x = trainer.family.sample(seed=1, split="val", iteration=0, task_indices=[0]).query_x[0].double()
    with fused_batch_norm(False):
        torch.testing.assert_close(trainer.model(fused, x), trainer.model(written, x), atol=1e-6, rtol=0)


def test_second_order_maml_keeps_the_written_out_norm_and_evaluation_fuses_it(monkeypatch):
    """Under vmap, torch's fused batch norm gives a wrong double backward (d/dx of the weight's
    gradient): second-order MAML must not use it (its float64 reference test would fail)."""
    calls = []
    fused_kernel = torch.nn.functional.batch_norm
    monkeypatch.setattr(torch.nn.functional, "batch_norm",
                        lambda *args, **kwargs: calls.append(torch.is_grad_enabled()) or fused_kernel(*args, **kwargs))
    trainer = Trainer(few_shot_spec({"name": "maml", "inner_lr": 0.4, "inner_steps": 1}, "batch"))
    assert trainer.algorithm.differentiates_norm_twice
    state = trainer.init_state()
    batch = trainer.family.sample(seed=5, split="train", iteration=0, task_indices=range(2))
    grads, _ = trainer.algorithm.meta_gradient(state.params, *batch)
    assert not any(calls)  # only the metrics before adaptation (no gradient) use the fused kernel
    leaves = {name: value.detach().requires_grad_(True) for name, value in state.params.items()}
    losses, _ = torch.func.vmap(lambda *args: Algorithm.task_objective(trainer.algorithm, *args),
                                in_dims=(None, 0, 0, 0, 0))(leaves, *batch)
    expected = dict(zip(leaves, torch.autograd.grad(losses.sum(), list(leaves.values()))))
    for name, value in expected.items():
        assert torch.equal(grads[name], value), name
    fused = trainer.algorithm.evaluation_curves(state.params, *batch, steps=(0, 1), transductive=True)
    assert any(calls)  # evaluation's inner steps differentiate the norm once: the fused kernel
    curve = trainer.algorithm._curve((), (0, 1))  # outside the context: written out
    written, = curve({n: v.detach() for n, v in state.params.items()}, *batch)
    for got, want in zip(fused, written):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("algorithm", [{"name": "protonet"}, {"name": "anil", "inner_lr": 0.4, "inner_steps": 2}])
def test_metrics_before_adaptation_equal_the_plain_forward(algorithm):
    trainer = Trainer(few_shot_spec(algorithm, "batch"))
    state = trainer.init_state()
    batch = trainer.family.sample(seed=5, split="train", iteration=0, task_indices=range(3))
    _, metrics = trainer.algorithm.meta_gradient(state.params, *batch)
    with torch.no_grad():
        plain = trainer.algorithm._batched_query_metrics(state.params, *batch)
    for name, value in plain.items():
        torch.testing.assert_close(metrics[name], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("algorithm", [{"name": "protonet"}, {"name": "anil", "inner_lr": 0.4, "inner_steps": 2},
                                       {"name": "maml", "inner_lr": 0.4, "inner_steps": 1}])
def test_one_adaptation_gives_both_evaluation_passes_and_the_transductive_number_is_the_last_steps(algorithm):
    """``evaluation_passes`` adapts each task once for the served and the transductive pass:
    the numbers of two separate adaptations (within 1e-6); the evaluation reports the
    transductive number after the last step only."""
    trainer = Trainer(few_shot_spec(algorithm, "batch", evaluation={"every": 0, "tasks": 6, "inner_steps": [1, 2]}))
    state = trainer.init_state()
    batch = trainer.family.sample(seed=5, split="val", iteration=0, task_indices=range(3))
    served, transductive = trainer.algorithm.evaluation_passes(state.params, *batch, (0, 1, 2), (2,))
    expected = (trainer.algorithm.evaluation_curves(state.params, *batch, steps=(0, 1, 2)),
                trainer.algorithm.evaluation_curves(state.params, *batch, steps=(2,), transductive=True))
    for got, want in zip((*served, *transductive), (*expected[0], *expected[1])):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.equal(served[0][:, 2], transductive[0][:, 0])  # two passes, two numbers
    result = trainer.evaluate(state.params, tasks=6)
    assert {name for name in result if "transductive" in name} == {
        f"val/transductive_{kind}_step2{ci}" for kind in ("loss", "accuracy") for ci in ("", "_ci95")}
    trainer.close()


def test_evaluation_chunks_image_tasks_like_a_training_step_and_samples_them_ahead():
    trainer = Trainer(few_shot_spec({"name": "protonet"}, "batch", meta_batch_size=4))
    assert trainer.evaluation_chunk == 4
    state = trainer.init_state()
    chunked = trainer.evaluate(state.params, tasks=10)
    whole = Trainer(few_shot_spec({"name": "protonet"}, "batch", resources={"task_chunk": 10}))
    assert whole.evaluation_chunk == 10
    expected = whole.evaluate(state.params, tasks=10)
    assert chunked.keys() == expected.keys()
    for name, value in expected.items():
        assert chunked[name] == pytest.approx(value, abs=1e-6), name
    trainer.close()


RUN = """
import json, sys, torch
torch.set_num_threads(1)
from metaserve.workers.engine import Trainer
state = Trainer(json.loads(sys.argv[1])).run(sys.argv[2])
torch.save(state.params, sys.argv[2] + "/final.pt")
"""


def run_process(spec: dict, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", RUN, json.dumps(spec), str(out)], cwd=ROOT,
                            start_new_session=True)


def test_a_run_sigkilled_with_prefetching_on_resumes_to_the_uninterrupted_bits(tmp_path):
    spec = few_shot_spec({"name": "protonet"}, "batch", iterations=200, checkpoint_every=5)
    killed = run_process(spec, tmp_path / "killed")

    def checkpointed_iteration() -> int:
        checkpoint = load_checkpoint(tmp_path / "killed" / "checkpoint")
        return 0 if checkpoint is None else checkpoint.iteration

    def checkpointed_while_running() -> int:
        try:
            return checkpointed_iteration()
        except CheckpointError:  # read between the writer's two renames: look again
            return 0

    try:
        wait_until(lambda: checkpointed_while_running() >= 10, timeout_s=300,
                   message="a checkpoint at iteration 10")
        os.killpg(killed.pid, signal.SIGKILL)  # mid-run: a prefetched batch dies with it
        assert killed.wait(timeout=30) == -signal.SIGKILL
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
    assert checkpointed_iteration() < 200
    for out in (tmp_path / "killed", tmp_path / "whole"):
        process = run_process(spec, out)
        assert process.wait(timeout=600) == 0
    resumed = torch.load(tmp_path / "killed" / "final.pt")
    whole = torch.load(tmp_path / "whole" / "final.pt")
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name
