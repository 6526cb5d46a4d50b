"""The typefaces split by identity: no NFKD identity and no visual near-duplicate crosses
train/val/test, script groups come from the Unicode Script property, and val and test are
balanced across them (no script group over 35 % of either, Braille in neither)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metaserve.workers.tasks.typeface_split import (DUPLICATE_COSINE, MAX_SCRIPT_SHARE, identity, script_group,
                                                    split_classes, unicode_block, unicode_script)
from metaserve.workers.tasks.typefaces import SELECTION_SIZE, render_all, split_characters


def unit_renderings() -> torch.Tensor:
    _, renders, masks = render_all(SELECTION_SIZE)
    mean = (renders.float() * masks[:, :, None, None]).sum(1) / masks.sum(1)[:, None, None]
    return F.normalize(mean.flatten(1), dim=1)


def test_scripts_are_the_unicode_script_property_not_the_names_first_word() -> None:
    assert [unicode_script(c) for c in "AΑА𝕆ℂ①⠁ა"] == [
        "Latin", "Greek", "Cyrillic", "Common", "Common", "Common", "Braille", "Georgian"]
    assert script_group("𝕆") == "Common/Mathematical Alphanumeric Symbols"
    assert script_group("≠") == "Common/Mathematical Operators" and script_group("ª") == "Latin"
    assert unicode_block("→") == "Arrows" and unicode_script("\U000E0001") == "Common"
    assert unicode_script("\U0010FFFD") == "Unknown"


def test_identity_is_nfkd_without_combining_marks() -> None:
    assert {identity(c) for c in "1①𝟙𝟘"} == {"1", "0"}
    assert [identity(c) for c in "ℂºé≠Ａ"] == ["C", "o", "e", "=", "A"]
    assert identity("Α") == "Α"  # Greek capital alpha: a near-duplicate of A, not an identity


def test_no_identity_or_near_duplicate_crosses_splits_and_val_test_are_balanced() -> None:
    characters = render_all(SELECTION_SIZE)[0]
    unit = unit_renderings()
    for seed in (0, 1):
        report = split_characters(seed)
        kept = report.splits
        assert not set(kept["train"]) & set(kept["val"]) and not set(kept["val"]) & set(kept["test"])
        identities = {split: {identity(characters[i]) for i in ids} for split, ids in kept.items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not identities[a] & identities[b], (seed, a, b, identities[a] & identities[b])
            assert float((unit[kept[a]] @ unit[kept[b]].T).max()) <= DUPLICATE_COSINE, (seed, a, b)
        for split, ids in kept.items():  # the classes of one split can be told apart
            similarity = unit[ids] @ unit[ids].T
            assert float((similarity - 2 * torch.eye(len(ids))).max()) <= DUPLICATE_COSINE
        groups = {split: {script_group(characters[i]) for i in ids} for split, ids in kept.items()}
        assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
        assert not groups["val"] & groups["test"]  # whole script groups, as Omniglot's alphabets
        for split in ("val", "test"):
            counts = report.group_counts[split]
            assert sum(counts.values()) == len(kept[split]) >= 200
            assert max(counts.values()) <= MAX_SCRIPT_SHARE * len(kept[split]), (seed, split, counts)
            assert len(counts) >= 5 and "Braille" not in counts
        assert report.groups["Braille"] == report.groups["Latin"] == "train"


def test_the_documented_counts_of_split_seed_0() -> None:
    report = split_characters(0)
    assert report.counts() == {"train": 1396, "val": 250, "test": 298}
    assert report.removed == {"within_split": 1282, "identity_across_splits": 39,
                              "near_duplicate_across_splits": 302}


def test_an_identity_across_two_script_groups_is_dropped_from_the_held_out_split() -> None:
    """A tiny case by hand: '1' (Common/Basic Latin) and '①' (Common/Enclosed Alphanumerics)
    are one identity; whichever group is held out loses it, the other keeps it."""
    characters = ["1", "①", "A", "Α"]
    similarity = torch.eye(4)
    similarity[2, 3] = similarity[3, 2] = 0.95  # A and Greek Alpha look alike
    for seed in range(6):
        report = split_classes(characters, similarity, seed)
        where = {characters[i]: split for split, ids in report.splits.items() for i in ids}
        assert not ("1" in where and "①" in where and where["1"] != where["①"])
        assert not ("A" in where and "Α" in where and where["A"] != where["Α"])
        assert len(where) + sum(report.removed.values()) == 4
