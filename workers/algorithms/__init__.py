"""Meta-learning algorithms behind one interface (:class:`metaserve.workers.algorithms.base.Algorithm`)."""

from __future__ import annotations

from metaserve.workers.algorithms.anil import ANIL
from metaserve.workers.algorithms.base import Algorithm
from metaserve.workers.algorithms.finetune import Finetune
from metaserve.workers.algorithms.maml import MAML
from metaserve.workers.algorithms.mamlpp import MAMLPlusPlus
from metaserve.workers.algorithms.metacurvature import MetaCurvature
from metaserve.workers.algorithms.metasgd import MetaSGD
from metaserve.workers.algorithms.prompt import Prompt
from metaserve.workers.algorithms.protonet import ProtoNet
from metaserve.workers.algorithms.reptile import Reptile
from metaserve.workers.networks import FunctionalModel

ALGORITHM_CLASSES: dict[str, type[Algorithm]] = {
    "maml": MAML, "reptile": Reptile, "anil": ANIL, "metasgd": MetaSGD, "prompt": Prompt,
    "protonet": ProtoNet, "finetune": Finetune, "mamlpp": MAMLPlusPlus, "metacurvature": MetaCurvature,
}


def build_algorithm(spec, model: FunctionalModel, *, classification: bool, fast_path: bool = True) -> Algorithm:
    """The algorithm named by ``spec.name`` over ``model``; ``fast_path``: its meta-step batched
    by hand where that applies (:mod:`metaserve.workers.algorithms.batched`)."""
    try:
        algorithm_class = ALGORITHM_CLASSES[spec.name]
    except KeyError:
        raise ValueError(f"unknown algorithm {spec.name!r}; known: {sorted(ALGORITHM_CLASSES)}") from None
    return algorithm_class(spec, model, classification=classification, fast_path=fast_path)


__all__ = ["ALGORITHM_CLASSES", "Algorithm", "build_algorithm"]
