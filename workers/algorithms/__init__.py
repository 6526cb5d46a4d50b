"""Meta-learning algorithms behind one interface (:class:`metaserve.workers.algorithms.base.Algorithm`)."""

from __future__ import annotations

from metaserve.workers.algorithms.anil import ANIL
from metaserve.workers.algorithms.base import Algorithm
from metaserve.workers.algorithms.maml import MAML
from metaserve.workers.algorithms.metasgd import MetaSGD
from metaserve.workers.algorithms.prompt import Prompt
from metaserve.workers.algorithms.protonet import ProtoNet
from metaserve.workers.algorithms.reptile import Reptile
from metaserve.workers.models import FunctionalModel

ALGORITHM_CLASSES: dict[str, type[Algorithm]] = {
    "maml": MAML, "reptile": Reptile, "anil": ANIL, "metasgd": MetaSGD, "prompt": Prompt,
    "protonet": ProtoNet,
}


def build_algorithm(spec, model: FunctionalModel, *, classification: bool) -> Algorithm:
    """The algorithm named by ``spec.name`` over ``model``."""
    try:
        algorithm_class = ALGORITHM_CLASSES[spec.name]
    except KeyError:
        raise ValueError(f"unknown algorithm {spec.name!r}; known: {sorted(ALGORITHM_CLASSES)}") from None
    return algorithm_class(spec, model, classification=classification)


__all__ = ["ALGORITHM_CLASSES", "Algorithm", "build_algorithm"]
