"""Write a small few-shot image dataset in the upload format (an ``.npz`` with ``images``, uint8
``[N, H, W]``, and ``labels`` ``[N]``), made from the built-in glyphs family (characters
rendered from the DejaVu fonts matplotlib ships, each image with its own affine distortion;
no download): ``--classes`` characters × ``--images`` images each.

    python examples/make_glyphs_npz.py                        # glyphs.npz: 100 × 20, 28 px
    python examples/make_glyphs_npz.py -o mine.npz --classes 40 --images 10

Your own images go in the same two arrays (or a .zip/.tar of class folders): docs/DATASETS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from metaserve.workers.spec import GlyphsSpec
from metaserve.workers.tasks.glyphs import GlyphsFamily


def glyph_images(classes: int, images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [classes * images, size, size], labels int64)``: one task of the family's
    training split with ``classes`` ways and ``images`` shots is exactly that many distorted
    renderings of that many characters."""
    family = GlyphsFamily(GlyphsSpec(ways=classes, support_shots=images, query_shots=1,
                                     image_size=size))
    batch = family.sample(seed=seed, split="train", iteration=0, task_indices=[0])
    pixels = (batch.support_x[0, :, 0].clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.numpy(), batch.support_y[0].numpy().astype(np.int64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("glyphs.npz"))
    parser.add_argument("--classes", type=int, default=100, help="characters (at most 100)")
    parser.add_argument("--images", type=int, default=20, help="images per character")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    images, labels = glyph_images(arguments.classes, arguments.images, arguments.size, arguments.seed)
    np.savez_compressed(arguments.output, images=images, labels=labels)
    print(f"wrote {arguments.output}: {len(images)} images of {arguments.classes} classes, "
          f"{arguments.size}x{arguments.size}")


if __name__ == "__main__":
    main()
