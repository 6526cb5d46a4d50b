"""What converting an upload takes (:class:`Limits`) and gives (:class:`Converted`): shared by
the child process that runs a conversion (:mod:`metaserve.service.dataset_ingest`) and the
converters it picks (:mod:`metaserve.service.image_ingest`, :mod:`metaserve.service.table_ingest`),
which therefore need not import the runner that imports them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Limits:
    """The settings a conversion reads (plain data: they travel to the child as JSON)."""

    dataset_max_images: int
    dataset_max_image_side: int
    dataset_max_stored_bytes: int
    dataset_max_rows: int
    dataset_max_columns: int
    dataset_convert_memory_bytes: int
    dataset_max_expansion: int = 100
    upload_bytes: int = 0
    """The spooled upload's size (set by the child from the file, not a setting): what
    :func:`expansion_cap` scales."""

    @classmethod
    def of(cls, settings: Any) -> "Limits":
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__
                      if hasattr(settings, name)})


EXPANSION_FLOOR_BYTES = 64 * 1024**2
"""Decoded sizes up to this are accepted whatever the upload's size: small synthetic datasets
(blank or few-colour images) compress far better than photographs and are harmless."""


def expansion_cap(limits: Limits) -> int:
    """The most bytes an upload of ``limits.upload_bytes`` may decode to: ``dataset_max_expansion``
    times its size, at least :data:`EXPANSION_FLOOR_BYTES`. Real images compress 2-10× (PNG,
    ``np.savez_compressed``), so 100× refuses only what is mostly declared emptiness: a 1 MB npz
    of zeros declaring 1 GiB, a PNG bomb."""
    return max(EXPANSION_FLOOR_BYTES, limits.dataset_max_expansion * limits.upload_bytes)


@dataclass(frozen=True)
class Converted:
    """What an upload became: canonical ``files`` in the work directory, its ``kind``
    (``images`` or ``table``), the ``format`` uploaded, and ``meta`` (what submit checks a
    spec against: :func:`~metaserve.service.image_ingest.images_meta`, or a table's
    ``table.json``)."""

    kind: str
    format: str
    files: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> int | None:
        return self.meta.get("classes") if self.kind == "images" else None

    @property
    def images(self) -> int | None:
        return self.meta.get("images") if self.kind == "images" else None

    @property
    def shape(self) -> list[int] | None:
        return self.meta.get("shape") if self.kind == "images" else None
