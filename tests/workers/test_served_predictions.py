"""The served predictor (``load_meta_init`` → ``adapt`` → predictor, what ``POST
/v1/jobs/{id}/adapt`` runs) gives a query image the same output alone as inside a batch of
25, for conv4 and resnet12 and every normalization mode; training with ``batch`` norm stays
transductive, as in MAML's paper, and evaluation reports both numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metaserve.workers.engine import Trainer
from metaserve.workers.engine.final_artifact import MetaInitModel, load_meta_init
from tests import synthetic_datasets as synth

TOLERANCE = 1e-6
MODELS = {"conv4": {"name": "conv4", "filters": 8},
          "resnet12": {"name": "resnet12", "widths": [4, 6, 8, 10]}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("data") / "shapes.npz"
    images, labels = synth.shapes(classes=20, per_class=10)
    path.write_bytes(synth.npz_bytes(images, labels))
    return path


def spec(dataset: Path, model: dict, norm: str, algorithm: str = "maml") -> dict:
    return {"algorithm": {"name": algorithm},
            "task_family": {"name": "images", "path": str(dataset), "ways": 5, "support_shots": 1,
                            "query_shots": 5, "split": [0.5, 0.25, 0.25]},
            "model": {**model, "norm": norm}, "meta_batch_size": 2, "iterations": 2,
            "log_every": 1, "checkpoint_every": 2,
            "evaluation": {"every": 0, "tasks": 4, "inner_steps": [1]}}


def served_model(tmp_path: Path, job: dict, *, trained: bool = False):  # noqa: ANN201
    """``(served model, recipe)``: trained two iterations and loaded from its artifact, or
    (cheaper, the property holds for any parameters) built from the initial parameters."""
    if trained:
        Trainer(job).run(tmp_path)
        return load_meta_init(tmp_path)
    trainer = Trainer(job)
    recipe = trainer.algorithm.recipe()
    return MetaInitModel(trainer.init_state().params, {**recipe, "architecture": trainer.model.describe()},
                         trainer.spec.model_dump(mode="json")), recipe


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("norm,algorithm", [("batch", "maml"), ("support", "maml"),
                                            ("instance", "maml"), ("batch", "protonet")])
def test_one_query_image_alone_gets_its_prediction_in_a_batch_of_25(
        tmp_path, dataset, model, norm, algorithm) -> None:  # noqa: ANN001
    served, recipe = served_model(tmp_path, spec(dataset, MODELS[model], norm, algorithm),
                                  trained=(norm, algorithm) == ("batch", "maml"))
    generator = torch.Generator().manual_seed(1)
    support_x = torch.rand(5, 1, 28, 28, generator=generator)
    support_y = torch.arange(5)
    query_x = torch.rand(25, 1, 28, 28, generator=generator)
    predictor = served.adapt(support_x, support_y)
    together = predictor(query_x).detach()
    alone = torch.cat([predictor(query_x[i:i + 1]).detach() for i in range(25)])
    assert together.shape == (25, 5)
    assert (together - alone).abs().max().item() <= TOLERANCE
    shuffled = torch.randperm(25, generator=generator)
    assert (predictor(query_x[shuffled]).detach() - together[shuffled]).abs().max() <= TOLERANCE
    if norm in ("batch", "support"):
        assert recipe["served_normalization"] == "support_statistics"


def test_batch_norm_is_batch_dependent_without_the_support_statistics(tmp_path, dataset) -> None:  # noqa: ANN001
    """The defect the served predictor avoids: the transductive forward pass of the same
    parameters gives one image a different output alone than among 24 others."""
    served, _ = served_model(tmp_path, spec(dataset, MODELS["conv4"], "batch"))
    query_x = torch.rand(25, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    params = served.params
    together = served.functional(params, query_x).detach()
    alone = served.functional(params, query_x[:1]).detach()
    assert (together[:1] - alone).abs().max().item() > 1e-3


def test_batch_norm_evaluation_reports_the_served_and_the_transductive_numbers(
        tmp_path, dataset) -> None:  # noqa: ANN001
    trainer = Trainer(spec(dataset, MODELS["conv4"], "batch"))
    state = trainer.init_state()
    result = trainer.evaluate(state.params, split="val", tasks=6)
    assert {"val/accuracy_step1", "val/transductive_accuracy_step1",
            "val/transductive_accuracy_step1_ci95", "val/tasks"} <= set(result)
    assert result["val/loss_step1"] != result["val/transductive_loss_step1"]
    support = Trainer(spec(dataset, MODELS["conv4"], "support"))
    assert not any("transductive" in name for name in support.evaluate(
        support.init_state().params, split="val", tasks=6))


def test_served_accuracy_matches_the_evaluation_without_transduction(tmp_path, dataset) -> None:  # noqa: ANN001
    """The evaluation's (non-transductive) accuracy is what the served predictor scores on
    the same tasks, one query image at a time."""
    job = spec(dataset, MODELS["conv4"], "batch")
    trainer = Trainer(job)
    state = trainer.init_state()
    served = MetaInitModel(state.params, {**trainer.algorithm.recipe(),
                                          "architecture": trainer.model.describe()},
                           trainer.spec.model_dump(mode="json"))
    batch = trainer.family.sample(seed=0, split="val", iteration=0, task_indices=range(6))
    _, accuracy = trainer.algorithm.evaluation_curves(state.params, *batch, steps=(1,))
    for task in range(6):
        predictor = served.adapt(batch.support_x[task], batch.support_y[task], steps=1)
        hits = np.mean([int(predictor(batch.query_x[task][i:i + 1]).argmax()) == int(batch.query_y[task][i])
                        for i in range(batch.query_x.shape[1])])
        assert hits == pytest.approx(float(accuracy[task, 0]), abs=1e-6)
