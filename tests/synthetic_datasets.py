"""Small synthetic few-shot datasets made in a test, as a user would upload them: each class
is a random 7×7 binary pattern drawn at 4× (28×28 gray), each image of it shifted by up to two
pixels with a little noise. Also the hostile archives the upload must refuse."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 28


def shapes(classes: int = 30, per_class: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [classes × per_class, 28, 28], labels int64)``."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((classes, 7, 7)) < 0.4
    images, labels = [], []
    for label, pattern in enumerate(patterns):
        big = np.kron(pattern, np.ones((4, 4))) * 200.0
        for _ in range(per_class):
            dy, dx = rng.integers(-2, 3, size=2)
            image = np.roll(big, (dy, dx), axis=(0, 1)) + rng.normal(0, 12, (SIDE, SIDE))
            images.append(np.clip(image + 20, 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def npz_bytes(images: np.ndarray, labels: np.ndarray, compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, images=images, labels=labels)
    return buffer.getvalue()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def tree_members(images: np.ndarray, labels: np.ndarray, top: str = "data",
                 omniglot: bool = False) -> dict[str, bytes]:
    members = {}
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = f"alphabet{label % 2}/char{label:02d}" if omniglot else f"class{label:02d}"
        members[f"{top}/{folder}/{index:04d}.png"] = png(image)
    return members


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_with_link(members: dict[str, bytes], link: str, target: str, hard: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(link)
        info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
        info.linkname = target
        archive.addfile(info)
    return buffer.getvalue()


def zip_with_symlink(members: dict[str, bytes], link: str, target: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        info = zipfile.ZipInfo(link)
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, target)
    return buffer.getvalue()


def zip_bomb(name: str = "data/a/bomb.png", size: int = 200 * 2**20) -> bytes:
    """One member that declares ``size`` zero bytes, a few hundred KB compressed."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open(name, "w", force_zip64=True) as handle:
            chunk = bytes(2**20)
            for _ in range(size // 2**20):
                handle.write(chunk)
    return buffer.getvalue()


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file()) \
        if Path(path).exists() else []
