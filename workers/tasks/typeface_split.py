"""The ``typefaces`` family's class split: by script, with no character identity crossing splits.

Omniglot splits whole alphabets; here the units are **script groups** from the Unicode
Character Database (vendored in ``unicode/``, version 15.0.0): a character's ``Script``
property (Latin, Greek, Cyrillic, Braille, ...), and for the ``Common``/``Inherited`` scripts
(digits, punctuation, math, arrows, box drawing) its ``Block`` (``Common/Mathematical
Operators``, ``Common/Arrows``, ...). Python's ``unicodedata`` has no Script property, and a
name's first word is not a script (MATHEMATICAL, DOUBLE-STRUCK, CIRCLED, MODIFIER).

The construction (:func:`split_classes`), on the characters' mean renderings over their fonts:

1. **Script groups to splits.** Each group's *standalone size* is the number of its characters
   left after step 3 within the group alone and with no identity or near-duplicate outside
   the group. The groups are shuffled with ``split_seed``; a group whose standalone size is
   more than :data:`MAX_GROUP_SHARE` of a held-out split's target can only go to train (no
   Braille or math-operator flood), the others fill test, then val, up to
   :data:`SPLIT_FRACTIONS` of the total standalone size; the rest is train.
2. **No identity or near-duplicate across splits.** Two characters are one *identity* when
   their NFKD forms without combining marks are equal (① ⓵ 1 𝟙, ℂ C, º o, ≠ =, é e), and
   *near-duplicates* when their mean renderings have cosine similarity >
   :data:`DUPLICATE_COSINE` (Latin A, Greek Α, Cyrillic А). A test character is dropped if it
   is either with a kept train character; a val character if with a kept train or test one.
   Near-duplicates are not grouped transitively: at 0.9 the chains join half the characters.
3. **Distinct classes within a split.** Within a split (code-point order) a character that is
   a near-duplicate of one kept before it goes, so two classes of a task can be told apart.
   (Identities within one split stay: ① and 1 are different pictures.)

The counts (per split, per script group, and what each rule removed) are in
:class:`SplitReport` and docs/DATASETS.md; tests/workers/tasks/test_typeface_split.py checks
that no identity or near-duplicate crosses splits and that no script group has more than
:data:`MAX_SCRIPT_SHARE` of val or test.
"""

from __future__ import annotations

import bisect
import functools
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

UNICODE_DIRECTORY = Path(__file__).with_name("unicode")
UNICODE_VERSION = "15.0.0"
DUPLICATE_COSINE = 0.9
SPLIT_FRACTIONS = {"test": 0.15, "val": 0.15}
MAX_GROUP_SHARE = 0.35  # of a held-out split's target size, by standalone size
MAX_SCRIPT_SHARE = 0.35  # what the test asserts of the kept val and test splits
SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=2)
def _ranges(name: str) -> tuple[list[int], list[int], list[str]]:
    firsts, lasts, names = [], [], []
    for line in (UNICODE_DIRECTORY / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        span, value = (part.strip() for part in line.split(";"))
        first, _, last = span.partition("..")
        firsts.append(int(first, 16))
        lasts.append(int(last or first, 16))
        names.append(value)
    return firsts, lasts, names


def _lookup(name: str, character: str, missing: str) -> str:
    firsts, lasts, names = _ranges(name)
    index = bisect.bisect_right(firsts, ord(character)) - 1
    return names[index] if index >= 0 and ord(character) <= lasts[index] else missing


def unicode_script(character: str) -> str:
    """The character's Unicode ``Script`` property (Scripts.txt 15.0.0), e.g. ``Latin``."""
    return _lookup("scripts.txt", character, "Unknown")


def unicode_block(character: str) -> str:
    """The character's Unicode ``Block`` property (Blocks.txt 15.0.0), e.g. ``Arrows``."""
    return _lookup("blocks.txt", character, "No_Block")


def script_group(character: str) -> str:
    """The split's unit: the Script, or ``Common/<Block>`` (``Inherited/<Block>``) for the
    characters that belong to no one script."""
    script = unicode_script(character)
    return f"{script}/{unicode_block(character)}" if script in ("Common", "Inherited") else script


def identity(character: str) -> str:
    """NFKD without combining marks: ① → 1, 𝕆 → O, ℂ → C, º → o, ≠ → =, é → e."""
    decomposed = unicodedata.normalize("NFKD", character)
    base = "".join(c for c in decomposed if not unicodedata.category(c).startswith("M"))
    return base or character


@dataclass
class SplitReport:
    """Class indices per split and how they came to be."""

    splits: dict[str, list[int]]
    groups: dict[str, str] = field(default_factory=dict)  # script group → split
    removed: dict[str, int] = field(default_factory=dict)
    group_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split → group → kept

    def counts(self) -> dict[str, int]:
        return {split: len(ids) for split, ids in self.splits.items()}


def _dedupe(indices: Sequence[int], similarity: torch.Tensor) -> list[int]:
    keep: list[int] = []
    for index in indices:
        if not keep or not bool((similarity[index, keep] > DUPLICATE_COSINE).any()):
            keep.append(index)
    return keep


def split_classes(characters: Sequence[str], similarity: torch.Tensor, split_seed: int) -> SplitReport:
    """The split of ``characters`` (in code-point order) given their mean renderings' cosine
    ``similarity`` [C, C] (module docstring)."""
    groups = [script_group(c) for c in characters]
    identities = [identity(c) for c in characters]
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    near = similarity > DUPLICATE_COSINE
    identity_groups: dict[str, set[str]] = {}
    for index, key in enumerate(identities):
        identity_groups.setdefault(key, set()).add(groups[index])
    standalone: dict[str, int] = {}
    for group, indices in members.items():
        inside = torch.tensor([g == group for g in groups])
        alone = [i for i in indices if identity_groups[identities[i]] == {group}
                 and not bool((near[i] & ~inside).any())]
        standalone[group] = len(_dedupe(alone, similarity))
    total = sum(standalone.values())
    generator = torch.Generator().manual_seed(split_seed)
    names = sorted(members)
    order = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
    assignment: dict[str, str] = {}
    filled = {"test": 0, "val": 0}
    for group in order:
        assignment[group] = "train"
        for split in ("test", "val"):
            target = SPLIT_FRACTIONS[split] * total
            if filled[split] < target:
                if 0 < standalone[group] <= MAX_GROUP_SHARE * target:
                    assignment[group] = split
                    filled[split] += standalone[group]
                break
    assigned = {split: [i for i in range(len(characters)) if assignment[groups[i]] == split]
                for split in SPLITS}
    removed = {"within_split": 0, "identity_across_splits": 0, "near_duplicate_across_splits": 0}
    kept: dict[str, list[int]] = {}
    for split, earlier in (("train", ()), ("test", ("train",)), ("val", ("train", "test"))):
        before = [i for s in earlier for i in kept[s]]
        before_identities = {identities[i] for i in before}
        candidates = []
        for index in assigned[split]:
            if identities[index] in before_identities:
                removed["identity_across_splits"] += 1
            elif before and bool(near[index, before].any()):
                removed["near_duplicate_across_splits"] += 1
            else:
                candidates.append(index)
        kept[split] = _dedupe(candidates, similarity)
        removed["within_split"] += len(candidates) - len(kept[split])
    group_counts = {split: {} for split in SPLITS}
    for split in SPLITS:
        for index in kept[split]:
            group_counts[split][groups[index]] = group_counts[split].get(groups[index], 0) + 1
        group_counts[split] = dict(sorted(group_counts[split].items(), key=lambda item: -item[1]))
    return SplitReport({split: kept[split] for split in SPLITS}, dict(sorted(assignment.items())),
                       removed, group_counts)
