import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from metaserve.workers.cli import apply_overrides, train

SPEC_YAML = """
algorithm: {name: maml, inner_lr: 0.01, inner_steps: 1}
task_family: {name: sine}
model: {name: mlp, hidden: [8]}
meta_batch_size: 4
iterations: 4
evaluation: {every: 0, tasks: 10, inner_steps: [1]}
log_every: 2
"""


def test_apply_overrides_sets_nested_fields_parsed_as_yaml():
    document = {"algorithm": {"name": "maml"}, "iterations": 5}
    assert apply_overrides(document, ["algorithm.inner_steps=3", "model.hidden=[4, 4]", "name=demo"]) == {
        "algorithm": {"name": "maml", "inner_steps": 3}, "iterations": 5,
        "model": {"hidden": [4, 4]}, "name": "demo"}
    assert document == {"algorithm": {"name": "maml"}, "iterations": 5}


def test_apply_overrides_rejects_a_setting_without_equals_sign():
    with pytest.raises(typer.BadParameter, match="--set expects KEY.PATH=VALUE, got 'iterations'"):
        apply_overrides({}, ["iterations"])


def test_train_writes_metrics_jsonl_and_meta_init(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC_YAML)
    out = tmp_path / "out"
    train(spec_path, out, ["iterations=6"], "cpu", False)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6, 6]
    assert set(lines[0]["metrics"]) == {"train/loss_before", "train/loss_after", "train/tasks_per_second"}
    assert "test/loss_step1" in lines[-1]["metrics"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "meta_init.json", "meta_init.safetensors",
                                                     "metrics.jsonl"]
    assert json.loads((out / "meta_init.json").read_text())["iterations"] == 6


def test_train_runs_on_the_threads_its_workers_would_hold(tmp_path):
    """torch's default (every core) oversubscribes a shared machine; ``metaserve train`` takes the
    CPUs the job's workers would hold (one by default)."""
    import torch

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC_YAML)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(spec_path, tmp_path / "out", ["iterations=1"], "cpu", False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_train_command_line_shows_progress_and_rejects_bad_specs(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC_YAML)
    program = ("import typer; from workers.cli import train; app = typer.Typer(); app.command()(train); app()")
    done = subprocess.run([sys.executable, "-c", program, str(spec_path), "--out", str(tmp_path / "o"),
                           "--set", "iterations=2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "done: 2 iterations" in done.stdout
    assert (tmp_path / "o" / "meta_init.safetensors").exists()
    bad = subprocess.run([sys.executable, "-c", program, str(spec_path), "--out", str(tmp_path / "b"),
                          "--set", "algorithm.inner_steps=-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "algorithm.maml.inner_steps" in bad.stderr and "greater than or equal to 0" in bad.stderr


@pytest.mark.parametrize("name", ["sine_maml", "sine_metasgd", "sine_prompt"])
def test_sine_examples_are_valid_specs_of_the_paper_setting(name):
    from pathlib import Path

    from metaserve.workers.cli import load_spec

    job = load_spec(Path(__file__).resolve().parents[2] / "examples" / f"{name}.yaml")
    assert job.algorithm.name == name.removeprefix("sine_")
    assert (job.algorithm.inner_steps, job.task_family.name, job.task_family.support_shots) == (1, "sine", 10)
    assert job.model.hidden == [40, 40]


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
JOB_EXAMPLES = [path for path in EXAMPLES if not path.stem.startswith("sweep_")]
SWEEP_EXAMPLES = [path for path in EXAMPLES if path.stem.startswith("sweep_")]


@pytest.mark.parametrize("path", JOB_EXAMPLES, ids=[path.stem for path in JOB_EXAMPLES])
def test_every_example_spec_is_valid(path):
    from metaserve.workers.cli import load_spec

    assert load_spec(path).task_family.name in path.stem  # validated, and the family it names


@pytest.mark.parametrize("path", SWEEP_EXAMPLES, ids=[path.stem for path in SWEEP_EXAMPLES])
def test_every_example_sweep_is_valid(path):
    import yaml

    from metaserve.workers.spec import JobSpec
    from metaserve.workers.sweep_spec import SweepSpec

    sweep = SweepSpec.model_validate(yaml.safe_load(path.read_text()))
    assert JobSpec.model_validate(sweep.spec).task_family.name in path.stem


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_train_runs_a_meta_rl_spec_on_ray_and_writes_the_meta_policy(tmp_path):
    spec_path = tmp_path / "maml_nav2d.yaml"
    spec_path.write_text(
        "algorithm: {name: maml, inner_lr: 0.1,\n"
        "            policy_gradient: {episodes_per_task: 2, hidden: [16], outer_epochs: 1}}\n"
        "task_family: {name: nav2d, horizon: 20}\n"
        "meta_batch_size: 2\niterations: 2\nlog_every: 1\n"
        "evaluation: {tasks: 4, inner_steps: [1]}\n")
    out = tmp_path / "out"
    train(spec_path, out, [], "cpu", False)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2]
    assert {"meta_policy.safetensors", "meta_policy.json"} <= {p.name for p in out.iterdir()}
