"""Tiny generated few-shot datasets whose pixels say which class and image they are.

Every image is 16×16 gray: the central 8×8 square has the class level, the rest the
instance level, and a 4×4 block in the top-left corner is white. The class and instance
survive a rotation by quarter turns; the white corner says by how many quarter turns the
image was rotated. The ``decode_image`` fixture reads them back from a sampled image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from metaserve.workers.tasks.base import TaskBatch

IMAGE_SIZE = 16
NUM_CLASSES = 40
IMAGES_PER_CLASS = 6
LEVEL_STEP = 5
MARKER = 255
CORNERS = ((1, 1), (IMAGE_SIZE - 2, 1), (IMAGE_SIZE - 2, IMAGE_SIZE - 2), (1, IMAGE_SIZE - 2))
"""Pixels inside the four corner blocks, in the order the white block visits them when the
image turns counter-clockwise by 0, 1, 2, 3 quarter turns (``torch.rot90`` over H, W)."""


def level(index: int) -> int:
    return 20 + LEVEL_STEP * index


def encoded_image(class_id: int, instance: int) -> np.ndarray:
    image = np.full((IMAGE_SIZE, IMAGE_SIZE), level(instance), dtype=np.uint8)
    image[4:12, 4:12] = level(class_id)
    image[0:4, 0:4] = MARKER
    return image


def _decode_image(image: torch.Tensor) -> tuple[int, int, int]:
    """``(class id, instance, quarter turns)`` of a sampled ``[C, 16, 16]`` image in [0, 1]."""
    pixels = image[0].double() * 255
    class_id = round((pixels[6:10, 6:10].mean().item() - 20) / LEVEL_STEP)
    corners = torch.stack([pixels[r, c] for r, c in CORNERS])
    turns = int(corners.argmax())
    instance_level = corners[torch.arange(4) != turns].mean().item()
    return class_id, round((instance_level - 20) / LEVEL_STEP), turns


Decoded = tuple[int, int, int]


def _decode_episodes(batch: TaskBatch, ways: int) -> list[dict[int, list[Decoded]]]:
    """Per task: label → decoded (class, instance, turns) of its support then query images."""
    episodes = []
    for task in range(batch.support_x.shape[0]):
        by_label: dict[int, list[Decoded]] = {label: [] for label in range(ways)}
        for x, y in [(batch.support_x, batch.support_y), (batch.query_x, batch.query_y)]:
            for image, label in zip(x[task], y[task].tolist()):
                by_label[label].append(_decode_image(image))
        episodes.append(by_label)
    return episodes


@pytest.fixture(scope="session")
def decode_episodes() -> Callable[[TaskBatch, int], list[dict[int, list[Decoded]]]]:
    """Reads every episode of a batch of encoded images back, see :func:`_decode_episodes`."""
    return _decode_episodes


def _write_tree(root: Path, class_dirs: list[str], suffixes: tuple[str, ...]) -> Path:
    for class_id, class_dir in enumerate(class_dirs):
        folder = root / class_dir
        folder.mkdir(parents=True)
        for instance in range(IMAGES_PER_CLASS):
            suffix = suffixes[instance % len(suffixes)]
            image = Image.fromarray(encoded_image(class_id, instance), mode="L")
            image.save(folder / f"{instance:02d}{suffix}", **({"quality": 100} if suffix == ".jpg" else {}))
    return root


@pytest.fixture(scope="session")
def omniglot_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 alphabets × 10 characters × 6 PNGs: ``alphabet_a/character_c/ii.png``, class 10a + c."""
    dirs = [f"alphabet_{a}/character_{c:02d}" for a in range(4) for c in range(10)]
    return _write_tree(tmp_path_factory.mktemp("omniglot"), dirs, (".png",))


@pytest.fixture(scope="session")
def imagefolder_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 classes × 6 images, PNG and JPEG alternating: ``class_cc/ii.{png,jpg}``."""
    dirs = [f"class_{c:02d}" for c in range(NUM_CLASSES)]
    return _write_tree(tmp_path_factory.mktemp("imagefolder"), dirs, (".png", ".jpg"))


def _encoded_arrays(channels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """All images in a shuffled order, labelled ``100 + class id``."""
    pairs = [(c, i) for c in range(NUM_CLASSES) for i in range(IMAGES_PER_CLASS)]
    order = np.random.default_rng(0).permutation(len(pairs))
    images = np.stack([encoded_image(*pairs[k]) for k in order])
    labels = np.array([100 + pairs[k][0] for k in order], dtype=np.int64)
    if channels is not None:
        images = np.repeat(images[:, None], channels, axis=1)
    return images, labels


@pytest.fixture(scope="session")
def npz_gray(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``images`` uint8 [240, 16, 16], ``labels`` [240] in 100..139, shuffled."""
    images, labels = _encoded_arrays(channels=None)
    path = tmp_path_factory.mktemp("npz") / "gray.npz"
    np.savez(path, images=images, labels=labels)
    return path


@pytest.fixture(scope="session")
def npz_rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``images`` uint8 [240, 3, 16, 16] (equal channels), ``labels`` [240], shuffled."""
    images, labels = _encoded_arrays(channels=3)
    path = tmp_path_factory.mktemp("npz") / "rgb.npz"
    np.savez(path, images=images, labels=labels)
    return path
