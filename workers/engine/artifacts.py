"""The meta-initialization artifact: ``meta_init.safetensors`` (model parameters, and Meta-SGD's
learned ``inner_lr.*`` rates) + ``meta_init.json`` (architecture, adaptation recipe, task
family, evaluation, spec, versions); and the small loader/adapter the SDK uses."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import Tensor

from metaserve.workers.engine.checkpoints import atomic_save_tensors, atomic_write_bytes

META_INIT_TENSORS = "meta_init.safetensors"
META_INIT_JSON = "meta_init.json"
FORMAT_VERSION = 1


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def export_meta_init(*, directory: Path, params: dict[str, Tensor], architecture: dict, recipe: dict,
                     task_family: dict, evaluation: dict, spec: dict, iteration: int) -> list[Path]:
    tensors_path = Path(directory) / META_INIT_TENSORS
    json_path = Path(directory) / META_INIT_JSON
    atomic_save_tensors(tensors_path, params, {"format": str(FORMAT_VERSION)})
    document = {
        "format": FORMAT_VERSION,
        "architecture": architecture,
        "recipe": recipe,
        "task_family": task_family,
        "evaluation": evaluation,
        "iterations": iteration,
        "spec": spec,
        "versions": {"metaserve": _version("metaserve"), "torch": torch.__version__},
    }
    atomic_write_bytes(json_path, json.dumps(document, indent=2, sort_keys=True).encode())
    return [tensors_path, json_path]


class MetaInitModel(torch.nn.Module):
    """A loaded meta-initialization as a module: ``model(x)`` predicts with θ* for a batch of one
    task's inputs; ``model.adapt(support_x, support_y)`` returns a predictor adapted to a task
    with the recorded recipe (algorithm, inner lr or learned lrs, inner steps)."""

    def __init__(self, params: dict[str, Tensor], recipe: dict, spec: dict):
        super().__init__()
        from metaserve.workers.algorithms import build_algorithm
        from metaserve.workers.models import build_model
        from metaserve.workers.spec import JobSpec

        job = JobSpec.model_validate(spec)
        architecture_input = tuple(recipe["architecture"]["input_shape"])
        self.functional = build_model(job.model, architecture_input, recipe["architecture"]["output_dim"],
                                      recipe["architecture"]["prompt_dim"])
        self.algorithm = build_algorithm(job.algorithm, self.functional, classification=job.is_classification)
        self._names = list(params)
        self.meta_params = torch.nn.ParameterList([torch.nn.Parameter(params[name]) for name in self._names])

    @property
    def params(self) -> dict[str, Tensor]:
        return dict(zip(self._names, self.meta_params))

    def forward(self, x: Tensor) -> Tensor:
        params = self.params
        return self.algorithm.predict(params, self.algorithm.initial_fast(params), x)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Callable[[Tensor], Tensor]:
        params = {name: value.detach() for name, value in self.params.items()}
        fast = self.algorithm.adapt(params, support_x, support_y,
                                    self.algorithm.inner_steps if steps is None else steps)
        return lambda x: self.algorithm.predict(params, fast, x)


def load_meta_init(directory: Path, device: str | torch.device = "cpu") -> tuple[MetaInitModel, dict]:
    """``(model, recipe)`` from ``meta_init.safetensors`` + ``meta_init.json`` in ``directory``."""
    document = json.loads((Path(directory) / META_INIT_JSON).read_text())
    params = load_file(str(Path(directory) / META_INIT_TENSORS), device=str(device))
    recipe = {**document["recipe"], "architecture": document["architecture"]}
    return MetaInitModel(params, recipe, document["spec"]), document["recipe"]


def adapt(model: MetaInitModel, support_x: Tensor, support_y: Tensor, steps: int | None = None
          ) -> Callable[[Tensor], Tensor]:
    """A predictor for one task adapted from ``model`` on its support set (see :class:`MetaInitModel`)."""
    return model.adapt(support_x, support_y, steps)
