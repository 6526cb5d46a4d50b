"""The base of every spec model, built-in or from a plugin, and the bounds and field types
specs share.

Kept apart from :mod:`metaserve.workers.spec` because plugins import it: the spec module
loads the plugins while it builds its unions (:mod:`metaserve.workers.plugins`), so what a
plugin imports must not import the spec module back.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

# Bounds every spec shares: each number a client sends is bounded.
MAX_ITERATIONS = 10_000_000
MAX_META_BATCH = 4096
MAX_INNER_STEPS = 100
MAX_WORKERS = 1024
MAX_SHOTS = 1000
MAX_WAYS = 100
CONV4_MIN_IMAGE_SIZE = 16

LearningRate = Annotated[float, Field(gt=0.0, le=100.0)]
InnerSteps = Annotated[StrictInt, Field(ge=0, le=MAX_INNER_STEPS)]

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""C0, DEL and C1: NUL (PostgreSQL text cannot hold it), ESC/CSI (terminal escapes), newlines."""


class StrictModel(BaseModel):
    """Base of every spec model: unknown fields, non-finite floats and control characters in
    strings are rejected."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_characters(cls, value: object) -> object:
        if isinstance(value, str) and CONTROL_CHARACTERS.search(value):
            raise ValueError("control characters (NUL, ESC, newlines, ...) are not allowed")
        return value
