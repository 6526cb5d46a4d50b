import pytest

from metaserve.workers.spec import LinearSpec, SineSpec
from metaserve.workers.tasks import TASK_FAMILY_CLASSES, build_task_family
from metaserve.workers.tasks.regression import LinearFamily, SineFamily


def test_registry_builds_regression_families_from_their_specs():
    assert isinstance(build_task_family(SineSpec()), SineFamily)
    assert isinstance(build_task_family(LinearSpec()), LinearFamily)


def test_registry_names_the_image_families_lazily():
    assert TASK_FAMILY_CLASSES["images"] == ("metaserve.workers.tasks.images", "ImagesFamily")
    assert TASK_FAMILY_CLASSES["glyphs"] == ("metaserve.workers.tasks.glyphs", "GlyphsFamily")


def test_registry_rejects_unknown_family():
    class Unknown:
        name = "mnist"

    with pytest.raises(ValueError, match="unknown task family 'mnist'"):
        build_task_family(Unknown())
