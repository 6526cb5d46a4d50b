"""The hard built-in few-shot family: ``typefaces``. No download.

Omniglot (Lake et al. 2015) has 20 people draw each character; here every character is drawn
by each font matplotlib ships that contains it: DejaVu Sans, Sans Mono and Serif in their four
styles, STIX General in its four, and the Computer Modern faces (cmr10, cmb10, cmti10, cmss10,
cmtt10: letters and digits only, their other code points are not the Unicode characters) — up
to 21 "drawers" per character. A class is a character drawn by at least :data:`MIN_FONTS`
fonts. An example is one font's rendering with its own stroke jitter (thinned or thickened by
a pixel, each with probability ``stroke_jitter / 2``) and elastic jitter (a smooth random
displacement field plus a small affine map, scaled by ``distortion``). Within a task the
support and query images of a class come from different fonts: ``support_shots`` fonts for
the support set, the queries from the class's other fonts.

Classes are split by script group, as Omniglot's background and evaluation alphabets are
(:mod:`~metaserve.workers.tasks.typeface_split`): the Unicode ``Script`` property (Latin,
Greek, Cyrillic, Braille, ...; ``Common/<Block>`` for digits, punctuation and symbols), whole
groups to train, val or test (shuffled with ``split_seed``; a group too large for a held-out
split stays in train, so no script has more than ~35 % of val or test). No character identity
(NFKD without combining marks: ① is 1, ℂ is C, ≠ is =) and no visual near-duplicate (cosine
similarity > 0.9 of the mean renderings over the fonts at 28 px: Latin "A", Greek "Α",
Cyrillic "А") crosses splits: the val or test character goes. Within a split the higher code
point of two near-duplicates goes, so two classes of one task can always be told apart. The
counts are logged and in docs/DATASETS.md.

The ``glyphs`` family stays as the quick demo (one font, affine jitter of one rendering).
"""

from __future__ import annotations

import functools
import logging
import unicodedata
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ft2font import FT2Font
from PIL import ImageFont

from metaserve.workers.spec import TypefacesSpec
from metaserve.workers.tasks.base import TaskBatch, task_generator
from metaserve.workers.tasks.fewshot import DatasetError, check_split, choose_classes, episode_shots
from metaserve.workers.tasks.glyphs import affine_thetas, render_glyph
from metaserve.workers.tasks.typeface_split import SplitReport, split_classes

logger = logging.getLogger(__name__)

FONT_DIRECTORY = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
UNICODE_FONTS = tuple(f"{family}{style}.ttf" for family in ("DejaVuSans", "DejaVuSansMono", "DejaVuSerif")
                      for style in ("", "-Bold", "-Oblique" if family != "DejaVuSerif" else "-Italic",
                                    "-BoldOblique" if family != "DejaVuSerif" else "-BoldItalic")) + (
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf")
ASCII_FONTS = ("cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf")
ASCII_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
MIN_FONTS = 6
KEPT_CATEGORIES = frozenset("LNPS")
FONT_SIZE = 0.75
SELECTION_SIZE = 28
MIN_INK_PIXELS = 12  # at 28 px: fewer is a dot or a tofu-less blank
MAX_ELASTIC = 0.12  # displacement std of the coarse field at distortion 1 ([-1, 1] units)
ELASTIC_GRID = 4
AFFINE_SHARE = 0.5  # the affine part of the jitter, relative to glyphs' at the same distortion


@functools.lru_cache(maxsize=1)
def font_coverage() -> dict[str, tuple[str, ...]]:
    """Character → the fonts (file names) that draw it, for characters in ≥ MIN_FONTS fonts."""
    fonts: dict[str, list[str]] = {}
    for name in UNICODE_FONTS + ASCII_FONTS:
        path = FONT_DIRECTORY / name
        if not path.is_file():
            raise DatasetError(f"font file {str(path)!r} that matplotlib ships does not exist")
        for code_point in FT2Font(str(path)).get_charmap():
            character = chr(code_point)
            if name in ASCII_FONTS and character not in ASCII_CHARACTERS:
                continue
            if unicodedata.category(character)[0] in KEPT_CATEGORIES:
                fonts.setdefault(character, []).append(name)
    return {c: tuple(f) for c, f in sorted(fonts.items()) if len(f) >= MIN_FONTS}


@functools.lru_cache(maxsize=16)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIRECTORY / name), round(FONT_SIZE * size),
                              layout_engine=ImageFont.Layout.BASIC)


@functools.lru_cache(maxsize=4)
def render_all(size: int) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor]:
    """``(characters, renders uint8 [C, F, size, size], font mask bool [C, F])`` of every
    covered character with visible ink in all its fonts (F: the font list, in order)."""
    names = UNICODE_FONTS + ASCII_FONTS
    characters, renders, masks = [], [], []
    for character, fonts in font_coverage().items():
        images = np.zeros((len(names), size, size), dtype=np.uint8)
        mask = np.zeros(len(names), dtype=bool)
        for index, name in enumerate(names):
            if name in fonts:
                images[index] = render_glyph(_font(name, size), character, size)
                mask[index] = (images[index] >= 128).sum() >= MIN_INK_PIXELS * (size / SELECTION_SIZE) ** 2
        if mask.sum() >= MIN_FONTS:
            characters.append(character)
            renders.append(images)
            masks.append(mask)
    return tuple(characters), torch.from_numpy(np.stack(renders)), torch.from_numpy(np.stack(masks))


@functools.lru_cache(maxsize=4)
def split_characters(split_seed: int) -> SplitReport:
    """Class indices (into :func:`render_all`'s characters at 28 px) per split, by
    :func:`~metaserve.workers.tasks.typeface_split.split_classes` on the mean renderings."""
    characters, renders, masks = render_all(SELECTION_SIZE)
    mean = (renders.float() * masks[:, :, None, None]).sum(1) / masks.sum(1)[:, None, None]
    unit = F.normalize(mean.flatten(1), dim=1)
    report = split_classes(characters, unit @ unit.T, split_seed)
    logger.info("typefaces splits", extra={"counts": report.counts(), "removed": report.removed})
    return report


class TypefacesFamily:
    """N-way K-shot classification of characters drawn by different fonts (module docstring)."""

    is_classification = True

    def __init__(self, spec: TypefacesSpec):
        self.spec = spec
        self.input_shape: tuple[int, int, int] = spec.input_shape
        self.output_dim: int = spec.output_dim
        self.characters, self.renders, self.masks = render_all(spec.image_size)
        selection = split_characters(spec.split_seed).splits
        allowed = set(self.characters)
        names = render_all(SELECTION_SIZE)[0]
        # the same characters at every size: render_all keeps a character by its ink at that
        # size, so map the selection's characters to this size's indices
        index = {c: i for i, c in enumerate(self.characters)}
        self._splits = {split: torch.tensor([index[names[i]] for i in ids if names[i] in allowed])
                        for split, ids in selection.items()}
        for split, classes in self._splits.items():
            if len(classes) < spec.ways:
                raise DatasetError(f"typefaces: the {split} split has {len(classes)} characters, "
                                   f"fewer than ways={spec.ways}")

    def classes(self, split: str) -> int:
        check_split(split)
        return len(self._splits[split])

    def split_characters(self, split: str) -> tuple[str, ...]:
        check_split(split)
        return tuple(self.characters[i] for i in self._splits[split].tolist())

    def _fonts(self, generator: torch.Generator, classes: torch.Tensor, support_shots: int,
               query_shots: int) -> torch.Tensor:
        """Font indices ``[ways, K+Q]``: ``K`` distinct fonts for the support, the queries
        from the class's other fonts (with replacement)."""
        rows = []
        for c in classes.tolist():
            available = torch.nonzero(self.masks[c]).flatten()
            order = available[torch.randperm(len(available), generator=generator)]
            support, rest = order[:support_shots], order[support_shots:]
            query = rest[torch.randint(len(rest), (query_shots,), generator=generator)]
            rows.append(torch.cat([support, query]))
        return torch.stack(rows)

    def _jitter(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 ``[N, S, S]`` → float ``[N, 1, S, S]`` in [0, 1]: stroke, elastic, affine."""
        count, size = images.shape[0], images.shape[-1]
        x = images.float().div_(255.0)[:, None]
        stroke = torch.rand(count, generator=generator)
        thicker = F.max_pool2d(x, 3, stride=1, padding=1)
        thinner = -F.max_pool2d(-x, 3, stride=1, padding=1)
        half = self.spec.stroke_jitter / 2
        x = torch.where((stroke < half)[:, None, None, None], thinner,
                        torch.where((stroke > 1 - half)[:, None, None, None], thicker, x))
        thetas = affine_thetas(torch.rand(count, 5, generator=generator),
                               AFFINE_SHARE * self.spec.distortion)
        grid = F.affine_grid(thetas, [count, 1, size, size], align_corners=False)
        coarse = torch.randn(count, 2, ELASTIC_GRID, ELASTIC_GRID, generator=generator)
        field = F.interpolate(coarse * MAX_ELASTIC * self.spec.distortion, size=(size, size),
                              mode="bicubic", align_corners=False)
        return F.grid_sample(x, grid + field.permute(0, 2, 3, 1), mode="bilinear",
                             padding_mode="zeros", align_corners=False).clamp_(0.0, 1.0)

    def sample(self, *, seed: int, split: str, iteration: int, task_indices: Sequence[int],
               support_shots: int | None = None) -> TaskBatch:
        """Episodes ``task_indices`` of ``iteration``: x float32 in [0, 1], y long in [0, ways)."""
        support_shots = episode_shots(split, self.spec.support_shots, support_shots)
        if support_shots > MIN_FONTS - 1:
            raise DatasetError(f"typefaces: support_shots={support_shots}, but a character may "
                               f"have only {MIN_FONTS} fonts and the queries need another")
        ways, query_shots = self.spec.ways, self.spec.query_shots
        classes_of_split = self._splits[split]
        support_x, support_y, query_x, query_y = [], [], [], []
        for task_index in task_indices:
            generator = task_generator(seed, split, iteration, task_index)
            positions, labels = choose_classes(generator, len(classes_of_split), ways)
            classes = classes_of_split[positions]
            fonts = self._fonts(generator, classes, support_shots, query_shots)
            images = self.renders[classes[:, None], fonts]  # [ways, K+Q, S, S]
            x = self._jitter(images.flatten(0, 1), generator).view(ways, -1, *self.input_shape)
            y = labels[:, None].expand(ways, support_shots + query_shots)
            support_x.append(x[:, :support_shots].flatten(0, 1))
            query_x.append(x[:, support_shots:].flatten(0, 1))
            support_y.append(y[:, :support_shots].flatten())
            query_y.append(y[:, support_shots:].flatten())
        if not support_x:
            empty = torch.empty(0, 0, *self.input_shape)
            return TaskBatch(empty, torch.empty(0, 0, dtype=torch.long), empty,
                             torch.empty(0, 0, dtype=torch.long))
        return TaskBatch(torch.stack(support_x), torch.stack(support_y), torch.stack(query_x),
                         torch.stack(query_y))
