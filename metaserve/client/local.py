"""Offline use of a downloaded artifact: no server and no API key. ``load_meta_init`` and
``adapt`` are :mod:`metaserve.workers.engine.final_artifact`'s loader, ``load_meta_policy``
:mod:`metaserve.workers.rl.loader`'s; the engine (and torch) is imported on use, so importing
the client stays light."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaserve.client.errors import MetaserveClientError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from metaserve.workers.engine.final_artifact import MetaInitModel
    from metaserve.workers.rl.loader import MetaPolicy

META_INIT_FILES = ("meta_init.safetensors", "meta_init.json")
META_POLICY_FILES = ("meta_policy.safetensors", "meta_policy.json")
ARTIFACT_FILES = {"meta_init": META_INIT_FILES, "meta_policy": META_POLICY_FILES}
LOADERS = {"meta_init": "load_meta_init", "meta_policy": "load_meta_policy"}


def load_meta_init(directory: str | Path) -> tuple["MetaInitModel", dict[str, Any]]:
    """``(model, recipe)`` from a downloaded meta-initialization directory (offline)."""
    from metaserve.workers.engine.final_artifact import load_meta_init as engine_load

    directory = Path(directory)
    missing = [name for name in META_INIT_FILES if not (directory / name).exists()]
    if missing:
        holds = all((directory / name).exists() for name in META_POLICY_FILES)
        hint = "; it holds a meta_policy (load it with load_meta_policy)" if holds else ""
        raise MetaserveClientError(f"{directory} has no {', '.join(missing)}{hint}")
    return engine_load(directory)


def load_meta_policy(directory: str | Path) -> "MetaPolicy":
    """A meta-policy from a downloaded directory (offline): ``policy.adapt(task)`` returns a
    policy adapted to a task (MAML-RL: the recipe's policy-gradient steps on episodes of it;
    PEARL: z from the posterior on its exploration episodes, or ``context=`` transitions you
    collected; RL²: a new trial, hidden state reset), whose ``act(observation)`` gives the
    action; ``policy.act`` acts before adaptation, ``policy.make_env(task)`` is a gymnasium env
    of the task, ``policy.sample_tasks`` draws new tasks of the job's family. See
    :mod:`metaserve.workers.rl.loader`."""
    from metaserve.workers.exceptions import ArtifactError
    from metaserve.workers.rl.loader import load_meta_policy as rl_load

    try:
        return rl_load(Path(directory))
    except ArtifactError as error:
        raise MetaserveClientError(str(error)) from None


def adapt(model: "MetaInitModel", support_x: "Tensor", support_y: "Tensor",
          steps: int | None = None) -> Callable[["Tensor"], "Tensor"]:
    """A predictor adapted to one task from ``model`` on its support set with the job's
    recipe (MAML/Reptile/ANIL/Meta-SGD/prompt: its inner lr(s) and inner steps; ``steps``
    overrides the step count). Regression: x ``[n, 1]``, y ``[n, 1]``; classification:
    x ``[n, C, H, W]``, y ``[n]`` class indices."""
    from metaserve.workers.engine.final_artifact import adapt as engine_adapt

    return engine_adapt(model, support_x, support_y, steps)


def adapt_rows(model: "MetaInitModel", *, support: Any = None, query: Any = None,
               support_x: Any = None, support_y: Any = None, query_x: Any = None,
               steps: int | None = None) -> dict[str, Any]:
    """A tabular job's meta-initialization adapted to a new entity's raw rows (offline):
    ``support``/``query`` as named columns or row objects, or ``support_x``/``support_y``/
    ``query_x`` in the job's feature order; scaled with the recipe the artifact records, and
    the query rows' ``predictions`` returned in the target's units (classification: logits,
    ``labels`` and ``classes`` as raw labels). See
    :meth:`~metaserve.workers.engine.final_artifact.MetaInitModel.adapt_rows`."""
    return model.adapt_rows(support=support, query=query, support_x=support_x,
                            support_y=support_y, query_x=query_x, steps=steps)
