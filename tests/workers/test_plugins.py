"""Plugins through entry points: the example plugin (examples/plugins/metaserve-example-plugin,
installed by ``make install``) is loaded, validated, built, costed, trained and recorded like a
built-in; broken plugins, installed as real distributions on ``sys.path``, are one log line
each and left out."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from metaserve.workers import plugins
from metaserve.workers.cost import estimate
from metaserve.workers.engine.final_artifact import load_meta_init
from metaserve.workers.engine.trainer import Trainer
from metaserve.workers.exceptions import ArtifactError
from metaserve.workers.networks import model_for
from metaserve.workers.spec import (BUILTIN_MODELS, BUILTIN_TASK_FAMILIES, MODELS, PLUGINS,
                                    TASK_FAMILIES, JobSpec)
from metaserve.workers.tasks import build_task_family
from tests.plugin_dists import (BROKEN_ENTRIES, BROKEN_PACKAGE, reason_matches,
                                write_broken_plugins, write_distribution)

EXAMPLE_PACKAGE = "metaserve-example-plugin"
FAMILY_ENTRY = "metaserve_example_plugin.tasks:DampedOscillatorFamily"
MODEL_ENTRY = "metaserve_example_plugin.networks:ResidualMLP"
PLUGIN_JOB = {"algorithm": {"name": "maml"}, "task_family": {"name": "oscillator"},
              "model": {"name": "resmlp"}}


def example_version() -> str:
    return metadata.version(EXAMPLE_PACKAGE)


def discover() -> plugins.Plugins:
    return plugins.discover(builtin_models=BUILTIN_MODELS,
                            builtin_task_families=BUILTIN_TASK_FAMILIES)


def test_the_example_plugin_joins_the_registries_with_its_package_and_version():
    described = {name: (p.kind, p.package, p.version, p.entry_point)
                 for name, p in {**PLUGINS.task_families, **PLUGINS.models}.items()}
    assert described == {
        "oscillator": ("task_family", EXAMPLE_PACKAGE, example_version(), FAMILY_ENTRY),
        "resmlp": ("model", EXAMPLE_PACKAGE, example_version(), MODEL_ENTRY)}
    assert TASK_FAMILIES["oscillator"] is PLUGINS.task_families["oscillator"].spec
    assert MODELS["resmlp"] is PLUGINS.models["resmlp"].spec
    assert "oscillator" not in BUILTIN_TASK_FAMILIES and "resmlp" not in BUILTIN_MODELS


def test_each_broken_plugin_is_one_log_line_naming_it_and_the_reason_and_is_left_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.syspath_prepend(str(write_broken_plugins(tmp_path)))
    with caplog.at_level(logging.WARNING, logger=plugins.__name__):
        found = discover()
    assert (set(found.task_families), set(found.models)) == ({"oscillator"}, {"resmlp"})
    reasons = {broken.name: broken.reason for broken in found.broken}
    assert set(reasons) == set(BROKEN_ENTRIES)
    for name in BROKEN_ENTRIES:
        assert reason_matches(name, reasons[name]), (name, reasons[name])
    lines = [record.getMessage() for record in caplog.records]
    assert sorted(lines) == sorted(broken.message() for broken in found.broken)
    group, value, reason = BROKEN_ENTRIES["import_error"]
    assert (f"plugin 'import_error' ({group} entry point {value!r}, package {BROKEN_PACKAGE}) "
            f"is not loaded: {reason}") in lines
    assert all("\n" not in line for line in lines)


def test_a_second_plugin_of_a_taken_name_is_refused_and_the_first_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(write_distribution(
        tmp_path, "other-oscillators", "2.0", {"metaserve.task_families": {
            "oscillator": "other_oscillators:Family"}}, {"other_oscillators.py": "Family = 1\n"})))
    found = discover()
    assert found.task_families["oscillator"].package == EXAMPLE_PACKAGE
    assert [(b.name, b.package, b.reason) for b in found.broken] == [
        ("oscillator", "other-oscillators",
         "the name 'oscillator' is already a task family (built-in or an earlier plugin)")]


def test_a_process_with_a_broken_plugin_still_loads_the_spec_and_says_so_in_one_line(
        tmp_path: Path):
    write_broken_plugins(tmp_path, ["import_error"])
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", "import metaserve.workers.spec as spec; "
                               "print(' '.join(sorted(spec.TASK_FAMILIES)))"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "oscillator" in result.stdout.split() and "import_error" not in result.stdout
    mentions = [line for line in result.stderr.splitlines() if "import_error" in line]
    assert mentions == [f"plugin 'import_error' (metaserve.task_families entry point "
                        f"'broken_import_plugin:Family', package {BROKEN_PACKAGE}) is not "
                        f"loaded: {BROKEN_ENTRIES['import_error'][2]}"]


def test_what_a_plugin_imports_does_not_import_the_spec_module_that_loads_it():
    """Plugins are imported while metaserve.workers.spec builds its unions: the modules they
    import (their interfaces) must not import it back."""
    code = ("import sys, metaserve.workers.spec_base, metaserve.workers.networks, "
            "metaserve.workers.tasks.base; print('metaserve.workers.spec' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize("change, location, kind", [
    ({"task_family": {"name": "oscillator", "bogus": 1}}, ("task_family", "oscillator", "bogus"),
     "extra_forbidden"),
    ({"task_family": {"name": "oscillator", "support_shots": 0}},
     ("task_family", "oscillator", "support_shots"), "greater_than_equal"),
    ({"task_family": {"name": "oscillator", "noise_std": float("nan")}},
     ("task_family", "oscillator", "noise_std"), "finite_number"),
    ({"model": {"name": "resmlp", "width": 0}}, ("model", "resmlp", "width"),
     "greater_than_equal"),
    ({"model": {"name": "resmlp", "activation": "swish"}}, ("model", "resmlp", "activation"),
     "literal_error"),
])
def test_plugin_specs_are_validated_like_built_ins_naming_the_field(change, location, kind):
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate({**PLUGIN_JOB, **change})
    assert [(error["loc"], error["type"]) for error in caught.value.errors()] == [(location, kind)]


def test_a_plugin_validator_error_names_the_plugin_field():
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate({**PLUGIN_JOB, "task_family": {"name": "oscillator",
                                                             "damping": [0.5, 0.1]}})
    [error] = caught.value.errors()
    assert (error["loc"], error["msg"]) == (
        ("task_family", "oscillator"),
        "Value error, damping: lower bound 0.5 is above upper bound 0.1")


def test_an_unknown_name_lists_the_plugins_among_the_expected_names():
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate({**PLUGIN_JOB, "model": {"name": "gated"}})
    [error] = caught.value.errors()
    assert error["type"] == "union_tag_invalid"
    assert error["ctx"]["expected_tags"] == ", ".join(repr(name) for name in MODELS)
    assert "'resmlp'" in error["ctx"]["expected_tags"]


def test_a_plugin_family_samples_each_task_from_its_own_counters():
    family = build_task_family(JobSpec.model_validate(PLUGIN_JOB).task_family)
    assert type(family) is PLUGINS.task_families["oscillator"].implementation
    whole = family.sample(seed=1, split="train", iteration=3, task_indices=[0, 1, 2, 3])
    assert [tuple(t.shape) for t in whole] == [(4, 10, 1)] * 4
    shard = family.sample(seed=1, split="train", iteration=3, task_indices=[2, 3])
    for full, part in zip(whole, shard):
        assert torch.equal(full[2:], part)
    more_support = family.sample(seed=1, split="train", iteration=3, task_indices=[0, 1, 2, 3],
                                 support_shots=25)
    assert tuple(more_support.support_x.shape) == (4, 25, 1)
    assert torch.equal(more_support.query_x, whole.query_x)
    assert torch.equal(more_support.query_y, whole.query_y)
    other_split = family.sample(seed=1, split="val", iteration=3, task_indices=[0, 1, 2, 3])
    assert not torch.equal(other_split.query_y, whole.query_y)


def test_the_plugin_network_is_built_and_the_cost_model_counts_it_on_the_meta_device():
    spec = JobSpec.model_validate({**PLUGIN_JOB, "model": {"name": "resmlp", "width": 16,
                                                           "blocks": 3}})
    model = model_for(spec)
    assert type(model) is PLUGINS.models["resmlp"].implementation
    params = model.init_params(torch.Generator().manual_seed(0))
    # input 1 → 16, three blocks of two 16 × 16 layers, head 16 → 1
    assert sum(value.numel() for value in params.values()) == 32 + 3 * 2 * 272 + 17 == 1681
    assert estimate(spec).parameters == 1681
    assert model(params, torch.zeros(5, 1)).shape == (5, 1)


@pytest.fixture(scope="module")
def plugin_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short MAML run of the example plugin's model on its task family, in process."""
    directory = tmp_path_factory.mktemp("plugin-job")
    spec = {**PLUGIN_JOB, "algorithm": {"name": "maml", "inner_lr": 0.1},
            "iterations": 150, "meta_batch_size": 8, "checkpoint_every": 150,
            "evaluation": {"every": 0, "tasks": 20, "inner_steps": [1]}, "seed": 2}
    Trainer(spec).run(directory)
    return directory


def test_the_artifact_records_the_plugins_with_their_package_and_version(plugin_artifact: Path):
    document = json.loads((plugin_artifact / "meta_init.json").read_text())
    assert document["plugins"] == [
        {"kind": "task_family", "name": "oscillator", "package": EXAMPLE_PACKAGE,
         "version": example_version(), "entry_point": FAMILY_ENTRY},
        {"kind": "model", "name": "resmlp", "package": EXAMPLE_PACKAGE,
         "version": example_version(), "entry_point": MODEL_ENTRY}]
    assert document["architecture"]["name"] == "resmlp"


def test_the_plugin_artifact_loads_and_adaptation_lowers_the_query_error(plugin_artifact: Path):
    model, recipe = load_meta_init(plugin_artifact)
    assert recipe["algorithm"] == "maml"
    family = build_task_family(JobSpec.model_validate(PLUGIN_JOB).task_family)
    tasks = family.sample(seed=99, split="test", iteration=0, task_indices=range(40))
    before, after = [], []
    for task in range(40):
        query_x, query_y = tasks.query_x[task], tasks.query_y[task]
        before.append(((model(query_x) - query_y) ** 2).mean().item())
        adapted = model.adapt(tasks.support_x[task], tasks.support_y[task], steps=5)
        after.append(((adapted(query_x) - query_y) ** 2).mean().item())
    mean_before, mean_after = sum(before) / 40, sum(after) / 40
    assert mean_after < 0.8 * mean_before, (mean_before, mean_after)


def test_loading_a_plugin_artifact_without_the_plugin_names_the_package_to_install(
        plugin_artifact: Path, monkeypatch: pytest.MonkeyPatch):
    """A client process where the plugin is not installed: its registry has no plugins."""
    import metaserve.workers.spec as spec_module

    monkeypatch.setattr(spec_module, "PLUGINS", plugins.Plugins())
    with pytest.raises(ArtifactError) as caught:
        load_meta_init(plugin_artifact)
    assert str(caught.value) == (
        f"this artifact uses the task family 'oscillator' of the plugin package "
        f"'{EXAMPLE_PACKAGE}' (version {example_version()}), which is not installed here: "
        f"pip install '{EXAMPLE_PACKAGE}=={example_version()}'")


def test_a_spec_naming_a_broken_plugin_says_it_failed_to_load_and_why(
        tmp_path: Path):
    """In a process where the plugin is broken (here: its import fails), the spec's error
    names the package and the reason instead of an unknown name; a broken plugin that
    reuses a built-in's name leaves the built-in alone."""
    write_broken_plugins(tmp_path, ["import_error", "sine"])
    code = """
import json
from pydantic import ValidationError
from metaserve.workers.spec import JobSpec
try:
    JobSpec.model_validate({"algorithm": {"name": "maml"}, "task_family": {"name": "import_error"}})
except ValidationError as error:
    print(json.dumps([[list(e["loc"]), e["msg"]] for e in error.errors()]))
print(JobSpec.model_validate({"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}})
      .task_family.__class__.__module__)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    errors, sine_module = result.stdout.strip().splitlines()
    assert json.loads(errors) == [[["task_family"], (
        f"Value error, 'import_error' comes from the plugin package {BROKEN_PACKAGE}, which is "
        f"installed but could not be loaded here: {BROKEN_ENTRIES['import_error'][2]}")]]
    assert sine_module == "metaserve.workers.spec_task_families"  # the built-in SineSpec


PICKY_NETWORK = '''
from typing import Literal

import torch

from metaserve.workers.networks import FunctionalModel
from metaserve.workers.spec_base import StrictModel


class OneFeature(FunctionalModel):
    class Spec(StrictModel):
        name: Literal["one_feature"] = "one_feature"

    def __init__(self, spec, input_shape, output_dim, prompt_dim=0):
        if tuple(input_shape) != (1,):
            raise ValueError(f"one_feature takes one input feature, got input_shape {tuple(input_shape)}")
        self.input_shape, self.output_dim, self.prompt_dim = (1,), output_dim, prompt_dim

    def init_params(self, generator):
        return {"head.weight": torch.zeros(self.output_dim, 1), "head.bias": torch.zeros(self.output_dim)}

    def features(self, params, x, prompt=None, stats_rows=None):
        return x

    def describe(self):
        return {"name": "one_feature"}
'''


def test_a_plugin_network_failing_on_a_spec_is_refused_at_submit_naming_the_plugin(
        tmp_path: Path):
    """The cost model builds the plugin's network for the job's family: its own refusal is a
    PluginSpecInvalid naming the plugin, which the server maps to a 422 on ``model``."""
    write_distribution(tmp_path, "picky-networks", "3.1", {"metaserve.models": {
        "one_feature": "picky_networks:OneFeature"}}, {"picky_networks.py": PICKY_NETWORK})
    code = """
import json
from metaserve.service.exceptions import PluginSpecRefused
from metaserve.service.limits import check_job_cost
from metaserve.service.settings import Settings
from metaserve.workers.spec import JobSpec
spec = {"algorithm": {"name": "maml"}, "model": {"name": "one_feature"}}
print(check_job_cost(spec=JobSpec.model_validate({**spec, "task_family": {"name": "sine"}}),
                     settings=Settings()).parameters)
try:
    check_job_cost(spec=JobSpec.model_validate({**spec, "task_family": {"name": "glyphs"}}),
                   settings=Settings())
except PluginSpecRefused as error:
    print(json.dumps([error.status_code, error.message, error.details]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    parameters, refused = result.stdout.strip().splitlines()
    assert parameters == "2"
    reason = ("the plugin model 'one_feature' (package picky-networks) fails on this spec: "
              "ValueError: one_feature takes one input feature, got input_shape (1, 28, 28)")
    assert json.loads(refused) == [422, f"model: {reason}", {"model": reason}]
