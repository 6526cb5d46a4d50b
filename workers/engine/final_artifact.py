"""The one artifact writer of every job kind, and the meta-initialization loader.

A job's final artifact is two files named for its kind: ``<kind>.safetensors`` (the tensors)
+ ``<kind>.json`` (``kind``, architecture, adaptation recipe, task family, evaluation, spec,
versions). The kinds:

- ``meta_init``: a meta-learning job's meta-initialization θ* (model parameters, and
  Meta-SGD's learned ``inner_lr.*`` rates); :func:`load_meta_init` loads it as a module that
  adapts with the recorded recipe.
- ``meta_policy``: a meta-RL job's meta-policy (RL²'s recurrent network, PEARL's encoder and
  policy, MAML-RL's Gaussian policy); :func:`metaserve.workers.rl.load_meta_policy` loads it.

The kind is recorded in the JSON, is what the files are named, and follows from the spec
(:func:`artifact_kind`); clients read it instead of assuming ``meta_init``.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import Tensor

from metaserve.workers.engine.checkpoints import atomic_save_tensors, atomic_write_bytes
from metaserve.workers.exceptions import ArtifactError

META_INIT = "meta_init"
META_POLICY = "meta_policy"
ARTIFACT_KINDS = (META_INIT, META_POLICY)
META_INIT_TENSORS = "meta_init.safetensors"
META_INIT_JSON = "meta_init.json"
META_POLICY_TENSORS = "meta_policy.safetensors"
META_POLICY_JSON = "meta_policy.json"
FORMAT_VERSION = 1
VERSIONED_PACKAGES = {META_INIT: ("metaserve", "torch"), META_POLICY: ("metaserve", "torch", "ray")}


def artifact_kind(spec: Any) -> str:
    """``meta_policy`` for a meta-RL job, else ``meta_init`` (``spec``: a JobSpec or its dict)."""
    if isinstance(spec, dict):
        from metaserve.workers.spec import RL_FAMILIES

        return META_POLICY if spec["task_family"]["name"] in RL_FAMILIES else META_INIT
    return META_POLICY if spec.is_rl else META_INIT


def artifact_files(kind: str) -> tuple[str, str]:
    """The two files of an artifact of ``kind``: (tensors, JSON document)."""
    if kind not in ARTIFACT_KINDS:
        raise ArtifactError(f"unknown artifact kind {kind!r}; known: {', '.join(ARTIFACT_KINDS)}")
    return f"{kind}.safetensors", f"{kind}.json"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _plugins_used(spec: dict) -> list:
    from metaserve.workers.spec import PLUGINS

    return PLUGINS.used_by(spec)


def check_plugins_installed(document: dict) -> None:
    """Raise :class:`ArtifactError` naming the package to install when the artifact used a
    plugin that this process has not loaded (not installed, or broken here)."""
    from metaserve.workers.spec import PLUGINS

    for used in document.get("plugins", []):
        kind = "model" if used["kind"] == "model" else "task_family"
        if PLUGINS.source(kind, used["name"]) is None:
            version = f"=={used['version']}" if used.get("version") else ""
            raise ArtifactError(
                f"this artifact uses the {kind.replace('_', ' ')} {used['name']!r} of the plugin "
                f"package {used['package']!r} (version {used.get('version') or 'unknown'}), "
                f"which is not installed here: pip install '{used['package']}{version}'")


def export_artifact(directory: Path, *, kind: str, tensors: dict[str, Tensor], architecture: dict,
                    recipe: dict, task_family: dict, evaluation: dict, spec: dict,
                    iteration: int) -> list[Path]:
    """Write the artifact of ``kind`` into ``directory`` (both files atomically); returns them."""
    tensors_name, json_name = artifact_files(kind)
    tensors_path, json_path = Path(directory) / tensors_name, Path(directory) / json_name
    # One metadata key: safetensors writes its metadata map in a per-process hash order, so two
    # keys made the same weights two different files (resumed vs undisturbed runs). The kind
    # is in the JSON and the file names.
    atomic_save_tensors(tensors_path, tensors, {"format": str(FORMAT_VERSION)})
    document = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "architecture": architecture,
        "recipe": recipe,
        "task_family": task_family,
        "evaluation": evaluation,
        "iterations": iteration,
        "spec": spec,
        "versions": {package: _version(package) for package in VERSIONED_PACKAGES[kind]},
        # The plugins the job used (task family, model), so a client without one is told
        # which package to install instead of failing on an unknown name.
        "plugins": [plugin.provenance() for plugin in _plugins_used(spec)],
    }
    atomic_write_bytes(json_path, json.dumps(document, indent=2, sort_keys=True).encode())
    return [tensors_path, json_path]


def find_artifact(directory: Path) -> str:
    """The kind of the artifact in ``directory`` (a job directory or a fetched one)."""
    found = [kind for kind in ARTIFACT_KINDS
             if all((Path(directory) / name).exists() for name in artifact_files(kind))]
    if len(found) != 1:
        expected = " or ".join(" + ".join(artifact_files(kind)) for kind in ARTIFACT_KINDS)
        raise ArtifactError(f"{directory} holds {'no' if not found else 'more than one'} "
                            f"artifact (expected {expected})")
    return found[0]


def read_artifact(directory: Path, kind: str, device: str | torch.device = "cpu"
                  ) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, document)`` of the artifact of ``kind`` in ``directory``; a directory
    holding the other kind raises :class:`ArtifactError` saying what it holds instead."""
    tensors_name, json_name = artifact_files(kind)
    directory = Path(directory)
    if not (directory / json_name).exists() or not (directory / tensors_name).exists():
        other = [k for k in ARTIFACT_KINDS if k != kind and (directory / f"{k}.json").exists()]
        hint = f"; it holds a {other[0]} (load it with load_{other[0]})" if other else ""
        raise ArtifactError(f"{directory} has no {tensors_name}, {json_name}{hint}")
    document = json.loads((directory / json_name).read_text())
    recorded = document.get("kind", kind)  # artifacts of before 0.2 have no "kind"
    if recorded != kind:
        raise ArtifactError(f"{directory / json_name} records kind {recorded!r}, not {kind!r}")
    return load_file(str(directory / tensors_name), device=str(device)), document


class MetaInitModel(torch.nn.Module):
    """A loaded meta-initialization as a module: ``model(x)`` predicts with θ* for a batch of one
    task's inputs (``model(x, support_x)`` for a model whose norm reads a set's statistics);
    ``model.adapt(support_x, support_y)`` returns a predictor adapted to a task with the
    recorded recipe (algorithm, inner lr or learned lrs, inner steps)."""

    def __init__(self, params: dict[str, Tensor], recipe: dict, spec: dict):
        super().__init__()
        from metaserve.workers.algorithms import build_algorithm
        from metaserve.workers.networks import build_model
        from metaserve.workers.spec import JobSpec

        job = JobSpec.model_validate(spec)
        architecture_input = tuple(recipe["architecture"]["input_shape"])
        self.functional = build_model(job.model, architecture_input, recipe["architecture"]["output_dim"],
                                      recipe["architecture"]["prompt_dim"])
        self.algorithm = build_algorithm(job.algorithm, self.functional, classification=job.is_classification)
        self.data_recipe: dict | None = recipe.get("data")
        """A ``tabular`` job's data recipe (features, targets, scalers, classes, time column,
        lags), which :meth:`adapt_rows` applies; None for other families."""
        self._names = list(params)
        self.meta_params = torch.nn.ParameterList([torch.nn.Parameter(params[name]) for name in self._names])

    @property
    def params(self) -> dict[str, Tensor]:
        return dict(zip(self._names, self.meta_params))

    def forward(self, x: Tensor, support_x: Tensor | None = None) -> Tensor:
        """θ*'s (unadapted) outputs, computed in float64 as :meth:`adapt`'s predictor is. Each
        row's output depends on that row alone, or, for ``batch`` and ``support`` norms, on
        that row and ``support_x`` (the set whose statistics normalize every row, as the served
        predictor uses the support set's); those norms without ``support_x`` are refused, since
        the statistics of ``x`` itself would make a row's output depend on its batch."""
        params = {name: value.double() for name, value in self.params.items()}
        fast = self.algorithm.initial_fast(params)
        norm = getattr(self.functional, "norm_mode", "none")
        if norm in ("batch", "support"):
            if support_x is None:
                raise ArtifactError(
                    f"this meta-initialization's norm {norm!r} normalizes with a set's statistics: "
                    f"call model(x, support_x) with the task's support images (or adapt(support_x, "
                    f"support_y)); the statistics of x itself would depend on the batch")
            output = self.algorithm.query_predict(params, fast, support_x.double(), x.double())
        else:
            output = self.algorithm.predict(params, fast, x.double())
        return output.to(x.dtype if x.is_floating_point() else torch.float32)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Callable[[Tensor], Tensor]:
        """The adapted predictor. Each query row's output depends on that row and the support
        set only (a set-statistics norm uses the support set's), and it is computed in float64
        and returned in ``x``'s dtype: float32 convolutions pick their kernels by batch size,
        which moved an output by 1.2e-6 between a batch of 1 and of 25; in float64 the
        difference is ~1e-15, below a float32 rounding step."""
        params = {name: value.detach().double() for name, value in self.params.items()}
        support_x = support_x.double()
        support_y = support_y if not support_y.is_floating_point() else support_y.double()
        fast = self.algorithm.adapt(params, support_x, support_y,
                                    self.algorithm.inner_steps if steps is None else steps)
        def predictor(x: Tensor) -> Tensor:
            output = self.algorithm.query_predict(params, fast, support_x, x.double())
            return output.to(x.dtype if x.is_floating_point() else torch.float32)

        return predictor

    def adapt_rows(self, *, support: Any = None, query: Any = None, support_x: Any = None,
                   support_y: Any = None, query_x: Any = None, steps: int | None = None) -> dict:
        """A ``tabular`` job's served task: a new entity's raw support rows and query rows
        (named columns, row objects, or arrays in the recorded feature order; see
        :mod:`metaserve.workers.tasks.tabular_rows`), scaled as in training, adapted to with the
        recipe, and the query rows' predictions in the target's own units (classification:
        logits and raw labels)."""
        from metaserve.workers.tasks.tabular_rows import parse_rows, predict_rows

        if self.data_recipe is None:
            raise ArtifactError("adapt_rows is for tabular jobs; this meta-initialization's "
                                "task family takes arrays: adapt(support_x, support_y)")
        task = parse_rows(self.data_recipe, support=support, query=query, support_x=support_x,
                          support_y=support_y, query_x=query_x)
        return predict_rows(self.data_recipe, task, self.adapt(task.support_x, task.support_y, steps))


def load_meta_init(directory: Path, device: str | torch.device = "cpu") -> tuple[MetaInitModel, dict]:
    """``(model, recipe)`` from ``meta_init.safetensors`` + ``meta_init.json`` in ``directory``."""
    params, document = read_artifact(directory, META_INIT, device)
    check_plugins_installed(document)
    recipe = {**document["recipe"], "architecture": document["architecture"]}
    return MetaInitModel(params, recipe, document["spec"]), document["recipe"]


def adapt(model: MetaInitModel, support_x: Tensor, support_y: Tensor, steps: int | None = None
          ) -> Callable[[Tensor], Tensor]:
    """A predictor for one task adapted from ``model`` on its support set (see :class:`MetaInitModel`)."""
    return model.adapt(support_x, support_y, steps)
