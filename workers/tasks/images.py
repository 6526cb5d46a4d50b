"""Few-shot image classification from a dataset: the ``images`` task family.

An uploaded dataset (``dataset: <id>``) is read from its canonical layout
(:mod:`metaserve.workers.tasks.uploaded`); a dataset on disk (``path``) in one of three layouts:

- ``omniglot``: ``root/alphabet/character/*.png`` (Lake et al. 2015), one class per character;
- ``imagefolder``: ``root/class/*.png`` (also ``.jpg``, ``.jpeg``, ``.bmp``), one class per folder;
- ``npz``: a NumPy archive with ``images`` (uint8 ``[N,H,W]`` or ``[N,C,H,W]``) and
  ``labels`` (``[N]``, integers or strings), read without pickle.

``layout: auto`` tells them apart. Every image is resized to ``image_size`` × ``image_size``,
converted to ``channels`` and held once per process as one uint8 tensor. Classes are split
train/val/test with ``split_seed``; with ``rotations`` every class of a split also appears
rotated by 90°, 180° and 270° as three more classes, after the split, so no character leaks
across splits (the protocol of Santoro et al. 2016 and Finn et al. 2017 on Omniglot).
Tasks are N-way K-shot episodes (Vinyals et al. 2016), see :mod:`metaserve.workers.tasks.fewshot`.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from metaserve.workers.spec import ImagesSpec
from metaserve.workers.tasks.base import SPLITS, TaskBatch, task_generator
from metaserve.workers.tasks.fewshot import (DatasetError, check_split, choose_classes, episode_batch, episode_shots,
                                    split_classes)
from metaserve.workers.tasks.uploaded import fetch_dataset, read_canonical

__all__ = ["DatasetError", "ImageDataset", "ImagesFamily", "detect_layout", "load_image_dataset",
           "load_uploaded_dataset"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
ROTATIONS = 4  # 0°, 90°, 180°, 270°
LOAD_THREADS = 8
DATASET_CACHE_SIZE = 8


@dataclass(frozen=True)
class ImageDataset:
    """All images of a dataset, grouped by class.

    ``images`` is uint8 ``[N, C, S, S]`` with the images of class ``c`` at
    ``class_offsets[c]:class_offsets[c + 1]``; ``class_names[c]`` names class ``c``.
    """

    images: torch.Tensor
    class_offsets: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def class_sizes(self) -> torch.Tensor:
        return self.class_offsets[1:] - self.class_offsets[:-1]


# --------------------------------------------------------------------------- layouts


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def detect_layout(path: str | os.PathLike[str]) -> str:
    """Which layout ``path`` is in: ``"npz"``, ``"imagefolder"`` or ``"omniglot"``."""
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"dataset path {str(path)!r} does not exist")
    if root.is_file():
        if root.suffix.lower() == ".npz":
            return "npz"
        raise DatasetError(f"dataset path {str(path)!r} is a file but not an .npz archive")
    children = _visible_dirs(root)
    if any(_image_files(child) for child in children):
        return "imagefolder"
    if any(_image_files(grandchild) for child in children for grandchild in _visible_dirs(child)):
        return "omniglot"
    raise DatasetError(
        f"dataset path {str(path)!r} holds no images in class/*.png (ImageFolder) "
        f"or alphabet/character/*.png (Omniglot) folders"
    )


def _class_folders(root: Path, layout: str) -> list[tuple[str, list[Path]]]:
    """``(class name, image files)`` per non-empty class folder, sorted by name."""
    if layout == "imagefolder":
        folders = [(child.name, child) for child in _visible_dirs(root)]
    else:
        folders = [
            (f"{alphabet.name}/{character.name}", character)
            for alphabet in _visible_dirs(root)
            for character in _visible_dirs(alphabet)
        ]
    classes = [(name, _image_files(folder)) for name, folder in folders]
    empty = [name for name, files in classes if not files]
    if empty:
        logger.warning(
            "skipping %d class folders without images", len(empty),
            extra={"dataset_path": str(root), "empty_classes": empty[:20]},
        )
    classes = [(name, files) for name, files in classes if files]
    if not classes:
        pattern = "class/*.png" if layout == "imagefolder" else "alphabet/character/*.png"
        raise DatasetError(f"dataset path {str(root)!r} holds no images in {pattern} folders")
    return classes


def _read_image(file: Path, image_size: int, channels: int) -> np.ndarray:
    try:
        with Image.open(file) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"image {str(file)!r} cannot be read: {error}") from error
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _load_folders(root: Path, layout: str, image_size: int, channels: int) -> ImageDataset:
    classes = _class_folders(root, layout)
    files = [file for _, class_files in classes for file in class_files]
    with ThreadPoolExecutor(max_workers=min(LOAD_THREADS, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(lambda f: _read_image(f, image_size, channels), files))
    sizes = torch.tensor([0] + [len(class_files) for _, class_files in classes])
    return ImageDataset(
        images=torch.from_numpy(np.stack(arrays)),
        class_offsets=sizes.cumsum(0),
        class_names=tuple(name for name, _ in classes),
    )


def _load_npz(file: Path, image_size: int, channels: int) -> ImageDataset:
    try:
        with np.load(file, allow_pickle=False) as archive:
            missing = {"images", "labels"} - set(archive.files)
            if missing:
                raise DatasetError(
                    f"npz file {str(file)!r}: arrays {sorted(missing)} are missing "
                    f"(it has {sorted(archive.files)})"
                )
            images, labels = archive["images"], archive["labels"]
    except (OSError, ValueError) as error:
        if isinstance(error, DatasetError):
            raise
        raise DatasetError(f"npz file {str(file)!r} cannot be read: {error}") from error
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DatasetError(
            f"npz file {str(file)!r}: images must be uint8 [N,H,W] or [N,C,H,W], "
            f"got {images.dtype} of shape {list(images.shape)}"
        )
    if images.ndim == 3:
        images = images[:, None]
    if images.shape[1] not in (1, 3):
        raise DatasetError(
            f"npz file {str(file)!r}: images [N,C,H,W] must have 1 or 3 channels, "
            f"got shape {list(images.shape)}"
        )
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iuU":
        raise DatasetError(
            f"npz file {str(file)!r}: labels must be integers or strings of shape [{len(images)}], "
            f"got {labels.dtype} of shape {list(labels.shape)}"
        )
    class_values, class_ids = np.unique(labels, return_inverse=True)
    order = np.argsort(class_ids, kind="stable")
    tensor = _convert_channels(torch.from_numpy(images[order]), channels)
    tensor = _resize(tensor, image_size)
    sizes = torch.from_numpy(np.bincount(class_ids, minlength=len(class_values)))
    return ImageDataset(
        images=tensor.contiguous(),
        class_offsets=torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]),
        class_names=tuple(str(value) for value in class_values),
    )


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` to ``channels``; RGB → gray with PIL's ITU-R 601-2 luma."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1)
    weights = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
    luma = (images.int() * weights).sum(1, keepdim=True) + 500
    return luma.div(1000, rounding_mode="floor").to(torch.uint8)


def _resize(images: torch.Tensor, image_size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` to ``[N, C, S, S]``, antialiased bilinear."""
    if images.shape[-2:] == (image_size, image_size):
        return images
    resized = [
        F.interpolate(part.float(), size=(image_size, image_size), mode="bilinear",
                      antialias=True, align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        for part in images.split(chunk)
    ]
    return torch.cat(resized)


@functools.lru_cache(maxsize=DATASET_CACHE_SIZE)
def _load_cached(
    path: str, mtime_ns: int, layout: str, image_size: int, channels: int
) -> ImageDataset:
    del mtime_ns  # part of the cache key only: a rewritten dataset is read again
    root = Path(path)
    if layout == "npz":
        return _load_npz(root, image_size, channels)
    return _load_folders(root, layout, image_size, channels)


@functools.lru_cache(maxsize=DATASET_CACHE_SIZE)
def load_uploaded_dataset(dataset_id: str, image_size: int, channels: int) -> ImageDataset:
    """An uploaded dataset (:mod:`metaserve.workers.tasks.uploaded`) as this family reads it
    (classes contiguous, resized to ``image_size``, converted to ``channels``), once per process."""
    images, labels, class_names = read_canonical(fetch_dataset(dataset_id))
    order = torch.argsort(labels, stable=True)
    sizes = torch.bincount(labels, minlength=len(class_names))
    images = _resize(_convert_channels(images[order], channels), image_size).contiguous()
    return ImageDataset(images=images,
                        class_offsets=torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]),
                        class_names=tuple(class_names))


def load_image_dataset(
    path: str | os.PathLike[str], *, layout: str = "auto", image_size: int, channels: int
) -> ImageDataset:
    """Read a dataset once per process (cached by path, mtime, layout, size and channels)."""
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"dataset path {str(path)!r} does not exist")
    detected = detect_layout(root)
    if layout == "auto":
        layout = detected
    elif (layout == "npz") != (detected == "npz"):
        kind = "an .npz file" if layout == "npz" else f"a directory in the {layout} layout"
        raise DatasetError(f"dataset path {str(path)!r} is not {kind}")
    resolved = root.resolve()
    return _load_cached(str(resolved), resolved.stat().st_mtime_ns, layout, image_size, channels)


# --------------------------------------------------------------------------- the family


class ImagesFamily:
    """N-way K-shot classification tasks over the classes of a dataset on disk."""

    is_classification = True

    def __init__(self, spec: ImagesSpec):
        self.spec = spec
        if spec.dataset is not None:
            self.dataset = load_uploaded_dataset(spec.dataset, spec.image_size, spec.channels)
        else:
            self.dataset = load_image_dataset(
                spec.path, layout=spec.layout, image_size=spec.image_size, channels=spec.channels
            )
        self.input_shape: tuple[int, int, int] = spec.input_shape
        self.output_dim: int = spec.output_dim
        rotations = ROTATIONS if spec.rotations else 1
        base_splits = split_classes(len(self.dataset.class_names), spec.split, spec.split_seed)
        # Rows (base class, quarter turns); rotations are added after the split.
        self._split_classes = {
            split: torch.cartesian_prod(base, torch.arange(rotations)).view(-1, 2)
            for split, base in base_splits.items()
        }
        for split, classes in self._split_classes.items():
            if len(classes) < spec.ways:
                raise DatasetError(
                    f"{spec.source}: the {split} split has {len(classes)} classes, "
                    f"fewer than ways={spec.ways} ({len(self.dataset.class_names)} classes split "
                    f"{spec.split}{', ×4 rotations' if spec.rotations else ''})"
                )
        self._eligible: dict[tuple[str, int], torch.Tensor] = {}
        for split in SPLITS:  # fail now, not at the first evaluation, if a split is too small
            self._eligible_classes(split, spec.support_shots + spec.query_shots)

    def classes(self, split: str) -> int:
        """Number of classes in ``split`` (rotated copies included)."""
        check_split(split)
        return len(self._split_classes[split])

    def _eligible_classes(self, split: str, shots: int) -> torch.Tensor:
        """The classes of ``split`` with at least ``shots`` images, as (class, turns) rows."""
        key = (split, shots)
        if key not in self._eligible:
            classes = self._split_classes[split]
            large_enough = self.dataset.class_sizes[classes[:, 0]] >= shots
            if not large_enough.all():
                small = sorted({self.dataset.class_names[c] for c in classes[~large_enough, 0].tolist()})
                logger.warning(
                    "%d classes of the %s split have fewer than %d images and are not sampled",
                    len(small), split, shots,
                    extra={"dataset": self.spec.source, "small_classes": small[:20]},
                )
            eligible = classes[large_enough]
            if len(eligible) < self.spec.ways:
                raise DatasetError(
                    f"{self.spec.source}: the {split} split has only "
                    f"{len(eligible)} classes with at least {shots} images "
                    f"(support + query shots), fewer than ways={self.spec.ways}"
                )
            self._eligible[key] = eligible
        return self._eligible[key]

    def sample(
        self,
        *,
        seed: int,
        split: str,
        iteration: int,
        task_indices: Sequence[int],
        support_shots: int | None = None,
    ) -> TaskBatch:
        """Episodes ``task_indices`` of ``iteration``: x float32 in [0, 1], y long in [0, ways)."""
        support_shots = episode_shots(split, self.spec.support_shots, support_shots)
        shots = support_shots + self.spec.query_shots
        eligible = self._eligible_classes(split, shots)
        offsets, sizes = self.dataset.class_offsets, self.dataset.class_sizes
        picks, turns, labels = [], [], []
        for task_index in task_indices:
            generator = task_generator(seed, split, iteration, task_index)
            positions, task_labels = choose_classes(generator, len(eligible), self.spec.ways)
            chosen = eligible[positions]
            picks.append(torch.stack([
                offsets[c] + torch.randperm(int(sizes[c]), generator=generator)[:shots]
                for c in chosen[:, 0].tolist()
            ]))
            turns.append(chosen[:, 1])
            labels.append(task_labels)
        if not picks:
            empty = torch.empty(0, self.spec.ways, shots, *self.input_shape)
            return episode_batch(empty, torch.empty(0, self.spec.ways, dtype=torch.long), support_shots)
        examples = self.dataset.images[torch.stack(picks)]  # [T, ways, K+Q, C, S, S] uint8
        turns_per_class = torch.stack(turns)
        for quarter_turns in range(1, ROTATIONS):
            rotated = turns_per_class == quarter_turns
            if rotated.any():
                examples[rotated] = torch.rot90(examples[rotated], quarter_turns, dims=(-2, -1))
        support_x, support_y, query_x, query_y = episode_batch(examples, torch.stack(labels), support_shots)
        return TaskBatch(support_x.float().div_(255.0), support_y, query_x.float().div_(255.0), query_y)
