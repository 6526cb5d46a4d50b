"""Built-in few-shot classification with no download: the ``glyphs`` task family.

An Omniglot-like benchmark (Lake et al. 2015) made from the DejaVu Sans font that matplotlib
ships: every class is one character, drawn from Latin, Greek, Cyrillic, Armenian, Hebrew,
Arabic, math symbols, arrows, box drawing and the other blocks the font covers. Each
example is the character's base glyph under a random affine distortion (rotation, scale,
shear, translation), in the spirit of the affine augmentations used on Omniglot
(Santoro et al. 2016). Tasks are N-way K-shot episodes (Vinyals et al. 2016) over the
characters of one split; characters are split 70/15/15 with ``split_seed``.

The character list is a function of the font file alone: every code point the font maps,
in code-point order, minus whitespace, control and combining marks, glyphs too small to
tell apart, and glyphs whose rendering is identical to a lower code point's (Latin "A",
Greek "Α" and Cyrillic "А" count once); ``num_characters`` of them are taken evenly spaced
over that list, so every script is represented. Base glyphs are rendered once per process
(white ink on black, centred, at twice ``image_size``) and distorted with
``affine_grid``/``grid_sample`` over a whole batch at once.
"""

from __future__ import annotations

import functools
import hashlib
import math
import unicodedata
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont

from metaserve.workers.spec import GlyphsSpec
from metaserve.workers.tasks.base import TaskBatch, task_generator
from metaserve.workers.tasks.fewshot import (DatasetError, check_split, choose_classes, episode_batch, episode_shots,
                                    split_classes)

__all__ = [
    "FONT_FILE", "GlyphsFamily", "affine_thetas", "distinct_characters", "render_glyph", "sampling_grids",
]

FONT_FILE = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
SPLIT = (0.7, 0.15, 0.15)
KEPT_CATEGORIES = frozenset("LNPS")  # letters, numbers, punctuation, symbols (no Z*, C*, M*)
FONT_SIZE = 0.75  # font size in pixels, as a fraction of the canvas side
GLYPH_FIT = 0.9  # a glyph larger than this fraction of the canvas is scaled down to fit
SELECTION_CANVAS = 32  # px: the renders that pick the characters, whatever image_size is
MIN_GLYPH_EXTENT = 0.3  # drop glyphs whose ink spans less than this fraction of the canvas
MAX_BASE_CANVAS = 256  # px: base glyphs are rendered at 2 × image_size, at most this
# Affine jitter at distortion 1; each parameter is uniform in ±(value · distortion).
MAX_ROTATION_DEG = 15.0
MAX_LOG_SCALE = 0.15
MAX_SHEAR = 0.15
MAX_SHIFT = 0.1  # in units of half the image side (affine_grid's [-1, 1] coordinates)


def render_glyph(font: ImageFont.FreeTypeFont, character: str, canvas: int) -> np.ndarray:
    """``character`` as uint8 ``[canvas, canvas]``, white on black, its ink box centred.

    Glyphs wider or taller than ``GLYPH_FIT · canvas`` are scaled down to fit; the rest keep
    their size relative to the font, so a period stays smaller than a letter.
    """
    left, top, right, bottom = font.getbbox(character)
    scratch = Image.new("L", (max(right - left, 1) + 2, max(bottom - top, 1) + 2))
    ImageDraw.Draw(scratch).text((1 - left, 1 - top), character, fill=255, font=font)
    ink_box = scratch.getbbox()
    result = Image.new("L", (canvas, canvas))
    if ink_box is None:
        return np.asarray(result)
    glyph = scratch.crop(ink_box)
    fit = GLYPH_FIT * canvas / max(glyph.size)
    if fit < 1:
        size = (max(1, round(glyph.width * fit)), max(1, round(glyph.height * fit)))
        glyph = glyph.resize(size, Image.Resampling.LANCZOS)
    result.paste(glyph, ((canvas - glyph.width) // 2, (canvas - glyph.height) // 2))
    return np.asarray(result)


@functools.lru_cache(maxsize=8)
def _font(canvas: int) -> ImageFont.FreeTypeFont:
    if not FONT_FILE.is_file():
        raise DatasetError(f"font file {str(FONT_FILE)!r} that matplotlib ships does not exist")
    # BASIC layout: no shaping engine, so the rendering does not depend on libraqm.
    return ImageFont.truetype(str(FONT_FILE), round(FONT_SIZE * canvas),
                              layout_engine=ImageFont.Layout.BASIC)


@functools.lru_cache(maxsize=1)
def distinct_characters() -> tuple[str, ...]:
    """Every character of the font that renders as a distinct, visible glyph, by code point."""
    font = _font(SELECTION_CANVAS)
    seen: set[bytes] = set()
    characters = []
    for code_point in sorted(FT2Font(str(FONT_FILE)).get_charmap()):
        character = chr(code_point)
        if unicodedata.category(character)[0] not in KEPT_CATEGORIES:
            continue
        ink = render_glyph(font, character, SELECTION_CANVAS) >= 128
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        if not len(rows):
            continue
        extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
        if extent < MIN_GLYPH_EXTENT * SELECTION_CANVAS:
            continue
        fingerprint = hashlib.blake2b(np.packbits(ink).tobytes(), digest_size=16).digest()
        if fingerprint not in seen:
            seen.add(fingerprint)
            characters.append(character)
    return tuple(characters)


def select_characters(count: int) -> tuple[str, ...]:
    """``count`` characters evenly spaced over :func:`distinct_characters`."""
    available = distinct_characters()
    if count > len(available):
        raise DatasetError(
            f"font file {str(FONT_FILE)!r} has {len(available)} distinct glyphs, "
            f"fewer than num_characters={count}"
        )
    return tuple(available[i * len(available) // count] for i in range(count))


@functools.lru_cache(maxsize=4)
def _base_glyphs(count: int, canvas: int) -> torch.Tensor:
    """float32 ``[count, 1, canvas, canvas]`` in [0, 1]: the undistorted glyphs."""
    font = _font(canvas)
    rendered = np.stack([render_glyph(font, c, canvas) for c in select_characters(count)])
    return torch.from_numpy(rendered).float().div_(255.0).unsqueeze(1)


def affine_thetas(uniforms: torch.Tensor, distortion: float) -> torch.Tensor:
    """``[..., 5]`` uniforms in [0, 1) → ``affine_grid`` matrices ``[..., 2, 3]``.

    The glyph is sheared, scaled, rotated and shifted: x ↦ A·x + b with
    A = R(rotation)·[[1, shear], [0, 1]]·scale; ``affine_grid`` wants the inverse map.
    """
    symmetric = uniforms * 2 - 1
    rotation = symmetric[..., 0] * math.radians(MAX_ROTATION_DEG) * distortion
    scale = torch.exp(symmetric[..., 1] * MAX_LOG_SCALE * distortion)
    shear = symmetric[..., 2] * MAX_SHEAR * distortion
    shift = symmetric[..., 3:5] * MAX_SHIFT * distortion
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    # A = scale · [[cos, cos·shear − sin], [sin, sin·shear + cos]]; det A = scale².
    a, b = cos * scale, (cos * shear - sin) * scale
    c, d = sin * scale, (sin * shear + cos) * scale
    inverse = torch.stack([d, -b, -c, a], dim=-1).unflatten(-1, (2, 2)) / (scale * scale)[..., None, None]
    offset = -(inverse @ shift[..., None])
    return torch.cat([inverse, offset], dim=-1)


def sampling_grids(thetas: torch.Tensor, size: int) -> torch.Tensor:
    """Sampling grids of ``thetas [G, M, 2, 3]`` stacked along the height: ``[G, M·size, size, 2]``.

    ``grids[g, m·size:(m+1)·size]`` equals ``F.affine_grid(thetas[g, m:m+1], [1, 1, size, size],
    align_corners=False)[0]``. An affine map of the pixel grid is separable,
    ``θ·(x, y, 1) = θ[:, 0]·x + (θ[:, 1]·y + θ[:, 2])``, so each coordinate is one broadcast
    sum over contiguous rows, about 10× faster than ``affine_grid`` on CPU for thousands of
    small images. The result is a permuted view (coordinates outermost in memory), which
    ``grid_sample`` reads as is.
    """
    groups, members = thetas.shape[:2]
    centres = torch.linspace(-1 + 1 / size, 1 - 1 / size, size, dtype=thetas.dtype)
    along_width = thetas[..., 0, None] * centres  # [G, M, 2, W]
    along_height = thetas[..., 1, None] * centres + thetas[..., 2, None]  # [G, M, 2, H]
    grids = torch.empty(groups, 2, members, size, size, dtype=thetas.dtype)
    for axis in range(2):
        torch.add(along_width[:, :, axis, None, :], along_height[:, :, axis, :, None], out=grids[:, axis])
    return grids.view(groups, 2, members * size, size).permute(0, 2, 3, 1)


class GlyphsFamily:
    """N-way K-shot classification of randomly distorted font glyphs."""

    is_classification = True

    def __init__(self, spec: GlyphsSpec):
        self.spec = spec
        self.input_shape: tuple[int, int, int] = spec.input_shape
        self.output_dim: int = spec.output_dim
        self.characters = select_characters(spec.num_characters)
        self._base_canvas = min(2 * spec.image_size, max(spec.image_size, MAX_BASE_CANVAS))
        self._splits = split_classes(len(self.characters), SPLIT, spec.split_seed)
        for split, classes in self._splits.items():
            if len(classes) < spec.ways:
                raise DatasetError(
                    f"glyphs: the {split} split has {len(classes)} characters, fewer than "
                    f"ways={spec.ways} (num_characters={spec.num_characters} split {SPLIT})"
                )

    @property
    def base_glyphs(self) -> torch.Tensor:
        """float32 ``[num_characters, 1, B, B]``, B = 2 · image_size (rendered on first use)."""
        return _base_glyphs(self.spec.num_characters, self._base_canvas)

    def classes(self, split: str) -> int:
        """Number of characters in ``split``."""
        check_split(split)
        return len(self._splits[split])

    def split_characters(self, split: str) -> tuple[str, ...]:
        check_split(split)
        return tuple(self.characters[i] for i in self._splits[split].tolist())

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
        ways, shots, size = self.spec.ways, support_shots + self.spec.query_shots, self.spec.image_size
        split_classes_ = self._splits[split]
        characters, labels, uniforms = [], [], []
        for task_index in task_indices:
            generator = task_generator(seed, split, iteration, task_index)
            positions, task_labels = choose_classes(generator, len(split_classes_), ways)
            characters.append(split_classes_[positions])
            labels.append(task_labels)
            uniforms.append(torch.rand(ways, shots, 5, generator=generator))
        tasks = len(characters)
        if not tasks:
            empty = torch.empty(0, ways, shots, *self.input_shape)
            return episode_batch(empty, torch.empty(0, ways, dtype=torch.long), support_shots)
        glyphs = self.base_glyphs[torch.stack(characters).flatten()]  # [T·ways, 1, B, B]
        thetas = affine_thetas(torch.stack(uniforms), self.spec.distortion).flatten(0, 1)
        # [T·ways, shots, 2, 3]: one grid per example, the shots of a class stacked along the
        # height, so every base glyph is read once for all its examples and the output of
        # grid_sample [T·ways, 1, K·size, size] already is the [T, ways·K, 1, size, size] batch.
        support_x, query_x = (
            F.grid_sample(glyphs, sampling_grids(part, size), mode="bilinear", padding_mode="zeros",
                          align_corners=False).clamp_(0.0, 1.0).view(tasks, -1, *self.input_shape)
            for part in (thetas[:, :support_shots], thetas[:, support_shots:])
        )
        per_class = torch.stack(labels)[:, :, None]
        query_shots = self.spec.query_shots
        support_y = per_class.expand(tasks, ways, support_shots).reshape(tasks, ways * support_shots)
        query_y = per_class.expand(tasks, ways, query_shots).reshape(tasks, ways * query_shots)
        return TaskBatch(support_x, support_y, query_x, query_y)
