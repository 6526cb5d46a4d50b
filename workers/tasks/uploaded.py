"""Uploaded datasets: their one canonical layout in the artifact store, and how a job's
driver and inner-loop workers read it.

``POST /v1/datasets`` validates an upload once and stores it as two objects under the
dataset's id (``ds_`` + 26 characters), beside the jobs' prefixes::

    <dataset_id>/dataset.safetensors   images uint8 [N, C, H, W], labels int64 [N]
    <dataset_id>/dataset.json          class names (label i is class_names[i]), shape, source

Images are in upload order (an upload is converted as a stream, never held whole); ``labels``
index ``class_names``. safetensors, not a pickle: nothing a user uploads is ever unpickled.

A process that reads datasets is told the store once (:func:`use_dataset_store`: the job's
supervisor and each inner-loop worker, from :class:`metaserve.workers.runner.RunOptions`);
:func:`fetch_dataset` then downloads a dataset into a per-host cache directory (datasets are
immutable: an id is never reused) with the sha256 the JSON records checked, and the ``images``
family reads it once per process
(:func:`metaserve.workers.tasks.images.load_uploaded_dataset`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from metaserve.workers.object_store import ArtifactStore, StorageConfig, StorageError, open_store
from metaserve.workers.tasks.fewshot import DatasetError

DATASET_TENSORS = "dataset.safetensors"
DATASET_JSON = "dataset.json"
DATASET_FILES = (DATASET_TENSORS, DATASET_JSON)
CANONICAL_FORMAT = 1
CACHE_DIRECTORY = "metaserve-datasets"

_store: ArtifactStore | None = None
_store_config: StorageConfig | None = None


# --------------------------------------------------------------------------- writing


def safetensors_header(entries: list[tuple[str, str, list[int]]], metadata: dict[str, str]) -> bytes:
    """The head of a safetensors file whose tensors ``(name, dtype, shape)`` follow in that
    order: an 8-byte little-endian length and the JSON header, padded to 8 bytes. Written
    first, so the tensors' bytes can be streamed after it as they are converted."""
    itemsize = {"U8": 1, "I64": 8}
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        size = int(np.prod(shape, dtype=np.int64)) * itemsize[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_canonical_json(directory: Path, *, class_names: list[str], shape: list[int],
                         images: int, source_format: str) -> Path:
    path = Path(directory) / DATASET_JSON
    digest = hashlib.sha256()
    with open(Path(directory) / DATASET_TENSORS, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    path.write_text(json.dumps({
        "format": CANONICAL_FORMAT, "class_names": class_names, "shape": shape,
        "images": images, "source_format": source_format,
        "tensors_sha256": digest.hexdigest()}, indent=1))
    return path


# --------------------------------------------------------------------------- reading


def use_dataset_store(config: StorageConfig | None) -> None:
    """Read uploaded datasets from the artifact store ``config`` in this process."""
    global _store, _store_config
    if config is not None and config != _store_config:
        _store, _store_config = open_store(config), config


def _cache_root() -> Path:
    return Path(tempfile.gettempdir()) / CACHE_DIRECTORY


def fetch_dataset(dataset_id: str, files: tuple[str, str] = DATASET_FILES) -> Path:
    """A local directory holding ``dataset_id``'s canonical ``files`` (tensors, JSON with
    their ``tensors_sha256``), downloaded once per host."""
    tensors_name, json_name = files
    target = _cache_root() / dataset_id
    if (target / json_name).is_file() and (target / tensors_name).is_file():
        return target
    if _store is None:
        raise DatasetError(f"dataset {dataset_id}: uploaded datasets are read from a metaserve "
                           "server's artifact store; outside a server, name a path")
    _cache_root().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dataset_id}-", dir=_cache_root()))
    try:
        for name in files:
            try:
                found = _store.open(dataset_id, name)
            except StorageError as error:
                raise DatasetError(f"dataset {dataset_id}: {error}") from None
            if found is None:
                raise DatasetError(f"dataset {dataset_id} does not exist (deleted?)")
            with open(scratch / name, "wb") as handle:
                for chunk in found[1]:
                    handle.write(chunk)
        _check_tensors(dataset_id, scratch, files)
        try:
            os.replace(scratch, target)  # atomic: another process may have won the race
        except OSError:
            if not (target / json_name).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def fetch_table(dataset_id: str) -> Path:
    """A local directory holding the uploaded table ``dataset_id`` (``table.safetensors`` +
    ``table.json``, see :mod:`metaserve.workers.tasks.table_format`)."""
    from metaserve.workers.tasks.table_format import TABLE_FILES

    if _store is None and not (_cache_root() / dataset_id / TABLE_FILES[1]).is_file():
        raise DatasetError(f"dataset {dataset_id}: uploaded tables are read from a metaserve "
                           "server's artifact store; submit the job to a server (metaserve "
                           "submit), or build TabularFamily(spec, directory=...) on a canonical "
                           "table directory")
    return fetch_dataset(dataset_id, TABLE_FILES)


def _check_tensors(dataset_id: str, directory: Path,
                   files: tuple[str, str] = DATASET_FILES) -> None:
    tensors_name, json_name = files
    recorded = json.loads((directory / json_name).read_text())["tensors_sha256"]
    digest = hashlib.sha256()
    with open(directory / tensors_name, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != recorded:
        raise DatasetError(f"dataset {dataset_id}: {tensors_name} does not match the sha256 "
                           "recorded at upload")


def read_canonical(directory: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images uint8 [N,C,H,W], labels long [N], class names)`` of a canonical directory."""
    from safetensors import safe_open

    document = json.loads((Path(directory) / DATASET_JSON).read_text())
    if document.get("format") != CANONICAL_FORMAT:
        raise DatasetError(f"{directory}: unknown dataset format {document.get('format')!r}")
    with safe_open(str(Path(directory) / DATASET_TENSORS), framework="pt") as tensors:
        images, labels = tensors.get_tensor("images"), tensors.get_tensor("labels")
    return images, labels, list(document["class_names"])


def copy_exactly(source: BinaryIO, target: BinaryIO, size: int, chunk: int = 1 << 20) -> None:
    """Copy exactly ``size`` bytes (a short source is a DatasetError)."""
    left = size
    while left:
        data = source.read(min(chunk, left))
        if not data:
            raise DatasetError(f"the data ends {left} bytes early")
        target.write(data)
        left -= len(data)
