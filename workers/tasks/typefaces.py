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

Classes are split by script, as Omniglot's background and evaluation alphabets are: letters
by the script in their Unicode name (LATIN, GREEK, CYRILLIC, ARMENIAN, HEBREW, ...), other
characters by their 256-code-point block; whole scripts go to train, val or test (shuffled
with ``split_seed``, the test split filled first to 15 % of the characters, then val to 15 %).
Near-duplicates are then removed (:func:`split_characters`): the rule, on the mean rendering
of a character over its fonts at 28 px, is cosine similarity > :data:`DUPLICATE_COSINE` —
within a split the higher code point goes (so two classes of one task can always be told
apart), across splits the val or test character goes (so no test class is a training class in
another script's clothes: Latin "A", Greek "Α", Cyrillic "А"). The counts are logged and in
docs/DATASETS.md.

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
DUPLICATE_COSINE = 0.9
SPLIT_FRACTIONS = {"test": 0.15, "val": 0.15}
MAX_ELASTIC = 0.12  # displacement std of the coarse field at distortion 1 ([-1, 1] units)
ELASTIC_GRID = 4
AFFINE_SHARE = 0.5  # the affine part of the jitter, relative to glyphs' at the same distortion


def script_of(character: str) -> str:
    """A letter's script (first word of its Unicode name), else its 256-code-point block."""
    if unicodedata.category(character)[0] == "L":
        return unicodedata.name(character, "UNKNOWN").split()[0]
    return f"U+{ord(character) >> 8:02X}xx"


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


def _script_splits(characters: Sequence[str], split_seed: int) -> dict[str, list[int]]:
    scripts: dict[str, list[int]] = {}
    for index, character in enumerate(characters):
        scripts.setdefault(script_of(character), []).append(index)
    generator = torch.Generator().manual_seed(split_seed)
    order = [sorted(scripts)[i] for i in torch.randperm(len(scripts), generator=generator).tolist()]
    splits: dict[str, list[int]] = {"test": [], "val": [], "train": []}
    for script in order:
        for split in ("test", "val"):
            if len(splits[split]) < SPLIT_FRACTIONS[split] * len(characters):
                splits[split].extend(scripts[script])
                break
        else:
            splits["train"].extend(scripts[script])
    return {split: sorted(indices) for split, indices in splits.items()}


@functools.lru_cache(maxsize=4)
def split_characters(split_seed: int) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Class indices (into :func:`render_all`'s characters) per split after the
    near-duplicate rule, and the counts the rule removed."""
    characters, renders, masks = render_all(SELECTION_SIZE)
    mean = (renders.float() * masks[:, :, None, None]).sum(1) / masks.sum(1)[:, None, None]
    unit = F.normalize(mean.flatten(1), dim=1)
    similarity = unit @ unit.T
    splits = _script_splits(characters, split_seed)
    removed = {"within_split": 0, "across_splits": 0}
    kept: dict[str, list[int]] = {}
    for split in ("train", "val", "test"):
        keep: list[int] = []
        for index in splits[split]:
            if keep and bool((similarity[index, keep] > DUPLICATE_COSINE).any()):
                removed["within_split"] += 1
                continue
            if split != "train" and bool((similarity[index, kept["train"]] > DUPLICATE_COSINE).any()):
                removed["across_splits"] += 1
                continue
            keep.append(index)
        kept[split] = keep
    logger.info("typefaces splits", extra={"counts": {s: len(v) for s, v in kept.items()},
                                           "removed": removed})
    return kept, removed


class TypefacesFamily:
    """N-way K-shot classification of characters drawn by different fonts (module docstring)."""

    is_classification = True

    def __init__(self, spec: TypefacesSpec):
        self.spec = spec
        self.input_shape: tuple[int, int, int] = spec.input_shape
        self.output_dim: int = spec.output_dim
        self.characters, self.renders, self.masks = render_all(spec.image_size)
        selection, _ = split_characters(spec.split_seed)
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
