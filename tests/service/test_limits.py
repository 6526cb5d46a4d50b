"""Cost limits: each spec a red-team pass submitted is refused naming the field, the
estimate and the cap; ordinary jobs pass."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import yaml

from metaserve.service.exceptions import CostLimitExceeded
from metaserve.service.limits import check_job_cost
from metaserve.service.settings import Settings
from metaserve.workers.spec import JobSpec

EXAMPLES = sorted(glob.glob(str(Path(__file__).resolve().parents[2] / "examples" / "*.yaml")))


def refused(spec: dict, **settings) -> CostLimitExceeded:  # noqa: ANN003
    with pytest.raises(CostLimitExceeded) as caught:
        check_job_cost(spec=JobSpec.model_validate(spec), settings=Settings(**settings))
    assert caught.value.status_code == 422
    return caught.value


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: Path(p).name)
def test_every_example_spec_is_within_the_default_limits(path: str):
    document = yaml.safe_load(Path(path).read_text())
    spec = document["spec"] if Path(path).name.startswith("sweep_") else document  # its base spec
    check_job_cost(spec=JobSpec.model_validate(spec), settings=Settings())


def test_ten_million_iterations_of_4096_tasks_are_refused_on_iterations():
    error = refused({"algorithm": {"name": "maml"}, "task_family": {"name": "sine"},
                     "iterations": 10_000_000, "meta_batch_size": 4096})
    assert list(error.details) == ["iterations"]
    assert error.details["iterations"] == (
        "iterations × meta_batch_size = 40,960,000,000 tasks, more than the cap of "
        "100,000,000 (METASERVE_MAX_META_TASKS)")


def test_a_forty_gigabyte_task_is_refused_on_task_family():
    error = refused({"algorithm": {"name": "maml"},
                     "task_family": {"name": "glyphs", "ways": 100, "support_shots": 1000,
                                     "query_shots": 1000, "image_size": 224}})
    assert "task_family" in error.details
    assert "one task's inputs 37.38 GiB" in error.details["task_family"]
    assert "more than the cap of 16.00 GiB (METASERVE_MAX_WORKER_MEMORY_MB)" in error.details["task_family"]


def test_a_thousand_tiny_workers_are_refused_on_resources_workers():
    error = refused({"algorithm": {"name": "maml"}, "task_family": {"name": "sine"},
                     "meta_batch_size": 1024,
                     "resources": {"workers": 1024, "cpus_per_worker": 0.001}})
    assert list(error.details) == ["resources.workers"]
    assert error.details["resources.workers"].startswith("the job would hold about ")
    assert error.details["resources.workers"].endswith(
        "more than the cap of 64.00 GiB (METASERVE_MAX_JOB_MEMORY_MB)")


def test_a_billion_parameter_mlp_is_refused_on_model():
    error = refused({"algorithm": {"name": "maml"}, "task_family": {"name": "sine"},
                     "model": {"name": "mlp", "hidden": [8192] * 16}})
    assert error.details["model"] == ("the network has 1,006,780,417 parameters, more than "
                                      "the cap of 20,000,000 (METASERVE_MAX_PARAMETERS)")
    assert error.message.startswith("the job is larger than this server accepts: model")


def test_a_large_meta_batch_on_one_worker_names_meta_batch_size_and_the_way_out():
    error = refused({"algorithm": {"name": "maml", "inner_steps": 5},
                     "task_family": {"name": "glyphs"}, "meta_batch_size": 32})
    assert list(error.details) == ["meta_batch_size"]
    assert error.details["meta_batch_size"].endswith(
        "set resources.task_chunk, add workers or lower meta_batch_size")
    check_job_cost(spec=JobSpec.model_validate(
        {"algorithm": {"name": "maml", "inner_steps": 5}, "task_family": {"name": "glyphs"},
         "meta_batch_size": 32, "resources": {"task_chunk": 8}}), settings=Settings())


def test_a_runtime_above_the_servers_cap_is_refused_and_caps_are_settings():
    error = refused({"algorithm": {"name": "maml"}, "task_family": {"name": "sine"},
                     "max_runtime_s": 100}, max_runtime_s=60)
    assert error.details == {"max_runtime_s": "100 s is more than the cap of 60 s "
                                              "(METASERVE_MAX_RUNTIME_S)"}
    error = refused({"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}},
                    max_job_pflop=1e-9)
    assert error.details["iterations"].endswith("(METASERVE_MAX_JOB_PFLOP)")
