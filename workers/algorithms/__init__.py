"""Meta-learning algorithms behind one interface (:class:`workers.algorithms.base.Algorithm`)."""

from __future__ import annotations

from workers.algorithms.anil import ANIL
from workers.algorithms.base import Algorithm
from workers.algorithms.maml import MAML
from workers.algorithms.metasgd import MetaSGD
from workers.algorithms.prompt import Prompt
from workers.algorithms.reptile import Reptile
from workers.models import FunctionalModel

ALGORITHM_CLASSES: dict[str, type[Algorithm]] = {
    "maml": MAML, "reptile": Reptile, "anil": ANIL, "metasgd": MetaSGD, "prompt": Prompt,
}


def build_algorithm(spec, model: FunctionalModel, *, classification: bool) -> Algorithm:
    """The algorithm named by ``spec.name`` over ``model``."""
    try:
        algorithm_class = ALGORITHM_CLASSES[spec.name]
    except KeyError:
        raise ValueError(f"unknown algorithm {spec.name!r}; known: {sorted(ALGORITHM_CLASSES)}") from None
    return algorithm_class(spec, model, classification=classification)


__all__ = ["ALGORITHM_CLASSES", "Algorithm", "build_algorithm"]
