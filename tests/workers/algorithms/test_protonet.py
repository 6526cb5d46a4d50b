"""ProtoNets (Snell et al. 2017): prototypes are class means of the support embeddings, the
prediction is the negative squared distance to them, the meta-gradient flows into the
embedding, and meta-training helps on held-out classes."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from metaserve.workers.algorithms import build_algorithm
from metaserve.workers.engine import Trainer
from metaserve.workers.networks import build_model
from metaserve.workers.spec import Conv4Spec, JobSpec, ProtoNetSpec, ResNet12Spec
from tests import synthetic_datasets as synth


def algorithm(model_spec=None):  # noqa: ANN001, ANN201
    model = build_model(model_spec or Conv4Spec(filters=4, norm="instance"), (1, 28, 28), 3)
    return build_algorithm(ProtoNetSpec(), model, classification=True)


def test_prototypes_are_class_means_and_predictions_negative_squared_distances() -> None:
    protonet = algorithm()
    params = protonet.init_params(torch.Generator().manual_seed(0))
    support_x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    support_y = torch.tensor([2, 0, 1, 0, 2, 1])
    query_x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    prototypes = protonet.adapt(params, support_x, support_y, steps=0)
    features = protonet.model.features(params, support_x)
    expected = torch.stack([features[support_y == k].mean(0) for k in range(3)])
    torch.testing.assert_close(prototypes, expected)
    query = protonet.model.features(params, query_x)
    torch.testing.assert_close(protonet.predict(params, prototypes, query_x),
                               -torch.cdist(query, expected) ** 2, atol=1e-4, rtol=1e-4)


def test_the_meta_gradient_reaches_the_embedding_not_the_unused_head() -> None:
    protonet = algorithm()
    params = protonet.init_params(torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(3)
    batch = (torch.rand(2, 3, 1, 28, 28, generator=generator), torch.arange(3).repeat(2, 1),
             torch.rand(2, 6, 1, 28, 28, generator=generator), torch.arange(3).repeat(2, 2))
    grads, metrics = protonet.meta_gradient(params, *batch)
    assert grads["blocks.0.conv.weight"].abs().sum() > 0
    assert torch.equal(grads["head.weight"], torch.zeros_like(params["head.weight"]))
    assert set(metrics) == {"loss_after", "accuracy_after", "loss_before", "accuracy_before"}


def test_protonet_needs_an_image_family_and_evaluates_at_step_0() -> None:
    with pytest.raises(ValidationError, match="protonet"):
        JobSpec.model_validate({"algorithm": {"name": "protonet"}, "task_family": {"name": "sine"}})
    spec = JobSpec.model_validate({"algorithm": {"name": "protonet"},
                                   "task_family": {"name": "glyphs"}})
    assert spec.evaluation.inner_steps == [0]
    assert algorithm(ResNet12Spec(widths=(2, 2, 2, 3))).recipe() == {
        "algorithm": "protonet", "inner_steps": 0, "adapts": "prototypes",
        "distance": "squared_euclidean", "served_predictor": "nearest_prototype",
        "served_normalization": "support_statistics"}


def test_meta_training_raises_held_out_accuracy_on_synthetic_shapes(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "shapes.npz"
    path.write_bytes(synth.npz_bytes(*synth.shapes(classes=30, per_class=10)))
    trainer = Trainer({"algorithm": {"name": "protonet"},
                       "task_family": {"name": "images", "path": str(path), "ways": 5,
                                       "support_shots": 1, "query_shots": 5,
                                       "split": [0.6, 0.2, 0.2]},
                       "model": {"name": "conv4", "filters": 8, "norm": "support"},
                       "meta_batch_size": 4, "iterations": 10, "outer_optimizer": {"lr": 0.005},
                       "evaluation": {"tasks": 40}})
    state = trainer.init_state()
    before = trainer.evaluate(state.params, split="test")["test/accuracy_step0"]
    for _ in range(10):
        state, _ = trainer.step(state)
    after = trainer.evaluate(state.params, split="test")["test/accuracy_step0"]
    assert after > before + 0.1, (before, after)
