"""The base of every spec model, built-in or from a plugin.

Kept apart from :mod:`metaserve.workers.spec` because plugins import it: the spec module
loads the plugins while it builds its unions (:mod:`metaserve.workers.plugins`), so what a
plugin imports must not import the spec module back.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, field_validator

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
