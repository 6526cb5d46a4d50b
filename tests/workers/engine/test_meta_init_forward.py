"""``MetaInitModel.forward`` (θ* unadapted, ``model(x)``) gives an image the same output alone
as inside a batch of 25 for every norm it serves; ``batch``/``support`` norms take the support
set's statistics (``model(x, support_x)``) and are refused without them."""

from __future__ import annotations

import pytest
import torch

from metaserve.workers.exceptions import ArtifactError
from tests.workers.test_served_predictions import (  # noqa: F401 - dataset: the fixture
    MODELS, TOLERANCE, dataset, served_model, spec)

NORMS = ("batch", "support", "instance", "layer", "none")


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
def test_unadapted_output_of_an_image_alone_equals_its_output_in_a_batch_of_25(
        tmp_path, dataset, model, norm, algorithm) -> None:  # noqa: ANN001
    served, _ = served_model(tmp_path, spec(dataset, MODELS[model], norm, algorithm))
    generator = torch.Generator().manual_seed(3)
    support_x = torch.rand(5, 1, 28, 28, generator=generator)
    x = torch.rand(25, 1, 28, 28, generator=generator)
    sets = (support_x,) if norm in ("batch", "support") else ()
    together = served(x, *sets).detach()
    alone = torch.cat([served(x[i:i + 1], *sets).detach() for i in range(25)])
    assert together.shape == (25, 5) and together.dtype == torch.float32
    assert (together - alone).abs().max().item() <= TOLERANCE
    if algorithm == "maml":  # (protonet's unadapted prototypes are all at the origin)
        assert together.std(0).max().item() > 1e-4  # the rows' outputs differ: not a constant
    if sets:
        other_support = torch.rand(5, 1, 28, 28, generator=generator)
        assert (served(x, other_support) - together).abs().max().item() > 1e-4  # the statistics are the support set's


@pytest.mark.parametrize("norm", ["batch", "support"])
def test_a_set_statistics_norm_without_the_support_set_is_refused(tmp_path, dataset, norm) -> None:  # noqa: ANN001
    served, _ = served_model(tmp_path, spec(dataset, MODELS["conv4"], norm))
    with pytest.raises(ArtifactError, match=f"norm '{norm}' normalizes with a set's statistics: "
                                            r"call model\(x, support_x\)"):
        served(torch.rand(3, 1, 28, 28))
