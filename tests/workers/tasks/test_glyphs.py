from __future__ import annotations

import unicodedata
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from metaserve.workers.spec import GlyphsSpec
from metaserve.workers.tasks.glyphs import (
    GlyphsFamily,
    _font,
    affine_thetas,
    distinct_characters,
    render_glyph,
    sampling_grids,
)
from metaserve.workers.tasks.images import DatasetError

SPLITS = ("train", "val", "test")


def family(**fields) -> GlyphsFamily:
    return GlyphsFamily(GlyphsSpec(**{"num_characters": 200, **fields}))


def identical_within(images: torch.Tensor) -> bool:
    return bool((images == images[:1]).all())


def test_batches_have_the_documented_shapes_types_and_labels():
    fam = family(ways=5, support_shots=2, query_shots=3)
    batch = fam.sample(seed=0, split="train", iteration=0, task_indices=[0, 1, 2])

    assert (fam.input_shape, fam.output_dim, fam.is_classification) == ((1, 28, 28), 5, True)
    assert [tuple(t.shape) for t in batch] == [(3, 10, 1, 28, 28), (3, 10), (3, 15, 1, 28, 28), (3, 15)]
    assert [t.dtype for t in batch] == [torch.float32, torch.long, torch.float32, torch.long]
    assert batch.support_x.min() == 0.0 and 0.9 < batch.support_x.max() <= 1.0
    for task in range(3):
        assert Counter(batch.support_y[task].tolist()) == {label: 2 for label in range(5)}
        assert Counter(batch.query_y[task].tolist()) == {label: 3 for label in range(5)}


def test_sampling_is_a_pure_function_of_seed_split_iteration_and_task():
    first = family().sample(seed=4, split="val", iteration=2, task_indices=[0, 1, 2])
    again = family().sample(seed=4, split="val", iteration=2, task_indices=[0, 1, 2])
    alone = family().sample(seed=4, split="val", iteration=2, task_indices=[1])
    next_iteration = family().sample(seed=4, split="val", iteration=3, task_indices=[0, 1, 2])
    other_seed = family().sample(seed=5, split="val", iteration=2, task_indices=[0, 1, 2])

    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a[1:2], b) for a, b in zip(first, alone))
    assert not torch.equal(first.support_x, next_iteration.support_x)
    assert not torch.equal(first.support_x, other_seed.support_x)


def glyph_set(batch) -> set[bytes]:
    return {image.numpy().tobytes() for image in torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)}


def test_without_distortion_each_label_is_one_glyph_of_its_split_and_labels_differ():
    fam = family(distortion=0.0, support_shots=1, query_shots=3)
    # Another seed's tasks, enough of them to show every character of each split.
    split_glyphs = {split: glyph_set(fam.sample(seed=1, split=split, iteration=0, task_indices=range(300)))
                    for split in SPLITS}

    assert [len(split_glyphs[split]) for split in SPLITS] == [140, 30, 30]
    for split in SPLITS:
        batch = fam.sample(seed=0, split=split, iteration=0, task_indices=range(10))
        for task in range(10):
            by_label = [torch.cat([batch.support_x[task][batch.support_y[task] == label],
                                   batch.query_x[task][batch.query_y[task] == label]]) for label in range(5)]
            assert all(identical_within(images) for images in by_label)
            glyphs = {images[0].numpy().tobytes() for images in by_label}
            assert len(glyphs) == 5 and glyphs <= split_glyphs[split]
    assert split_glyphs["train"].isdisjoint(split_glyphs["val"] | split_glyphs["test"])
    assert split_glyphs["val"].isdisjoint(split_glyphs["test"])


def test_distortion_makes_every_example_of_a_class_different():
    batch = family(distortion=1.0, support_shots=5, query_shots=5).sample(
        seed=0, split="train", iteration=0, task_indices=[0])
    examples = torch.cat([batch.support_x[0][batch.support_y[0] == 0],
                          batch.query_x[0][batch.query_y[0] == 0]])

    assert len({image.numpy().tobytes() for image in examples}) == 10


def test_characters_are_split_70_15_15_by_split_seed():
    fam = family(num_characters=100)
    characters = {split: set(fam.split_characters(split)) for split in SPLITS}

    assert [fam.classes(split) for split in SPLITS] == [70, 15, 15]
    assert set.union(*characters.values()) == set(fam.characters) and len(fam.characters) == 100
    assert characters["train"].isdisjoint(characters["val"] | characters["test"])
    assert characters["val"].isdisjoint(characters["test"])
    assert set(family(num_characters=100, split_seed=1).split_characters("test")) != characters["test"]


def test_character_list_is_visible_distinct_glyphs_in_code_point_order_from_many_scripts():
    characters = distinct_characters()
    font = _font(32)
    renders = {render_glyph(font, c, 32).tobytes() for c in characters}
    chosen = family(num_characters=1200).characters
    scripts = {unicodedata.name(c).split()[0] for c in chosen}

    assert len(characters) > 4000
    assert len(renders) == len(characters)
    assert list(characters) == sorted(characters)
    assert {unicodedata.category(c)[0] for c in characters} == {"L", "N", "P", "S"}
    assert "A" in characters and "\u0391" not in characters and "\u0410" not in characters  # Α, А look like A
    assert {"LATIN", "GREEK", "CYRILLIC", "ARMENIAN", "HEBREW", "ARABIC", "BOX", "BRAILLE"} <= scripts
    assert chosen == family(num_characters=1200, image_size=32).characters


def test_sampling_grids_equal_affine_grid():
    thetas = affine_thetas(torch.rand(4, 3, 5, generator=torch.Generator().manual_seed(0)), distortion=2.0)
    reference = F.affine_grid(thetas.view(12, 2, 3), [12, 1, 10, 10], align_corners=False)

    assert torch.allclose(sampling_grids(thetas, 10), reference.view(4, 30, 10, 2), atol=1e-6)


def test_zero_distortion_is_the_identity_transform():
    thetas = affine_thetas(torch.rand(6, 5), distortion=0.0)

    assert torch.equal(thetas, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(6, 2, 3))


def test_support_shots_argument_overrides_the_spec_and_empty_task_list_is_empty():
    fam = family()
    batch = fam.sample(seed=0, split="test", iteration=0, task_indices=[5], support_shots=4)
    empty = fam.sample(seed=0, split="test", iteration=0, task_indices=[])

    assert [tuple(t.shape) for t in batch] == [(1, 20, 1, 28, 28), (1, 20), (1, 75, 1, 28, 28), (1, 75)]
    assert [tuple(t.shape) for t in empty] == [(0, 5, 1, 28, 28), (0, 5), (0, 75, 1, 28, 28), (0, 75)]


def test_meta_batch_of_32_five_way_tasks_samples_in_one_call():
    batch = GlyphsFamily(GlyphsSpec()).sample(seed=0, split="train", iteration=0, task_indices=range(32))

    assert [tuple(t.shape) for t in batch] == [(32, 5, 1, 28, 28), (32, 5), (32, 75, 1, 28, 28), (32, 75)]


def test_split_with_fewer_characters_than_ways_is_a_dataset_error():
    with pytest.raises(DatasetError) as error:
        family(num_characters=20, ways=5)
    assert str(error.value) == (
        "glyphs: the val split has 3 characters, fewer than ways=5 "
        "(num_characters=20 split (0.7, 0.15, 0.15))"
    )


def test_more_characters_than_the_font_has_is_a_dataset_error():
    with pytest.raises(DatasetError, match=r"has \d+ distinct glyphs, fewer than num_characters=5000$"):
        family(num_characters=5000)
