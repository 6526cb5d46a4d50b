"""The cluster tests need root, namespaces, PostgreSQL 15 binaries and moto; elsewhere they skip
(under ``CI`` they fail instead, so the recipe cannot silently stop being tested)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.cluster.bed import Cluster, missing_requirements


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = missing_requirements()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"cluster test bed unavailable: {reason}")
        pytest.skip(f"cluster test bed unavailable: {reason}")
    bed = Cluster()
    started = time.monotonic()
    try:
        bed.up()
        print(f"\ncluster up in {time.monotonic() - started:.1f} s {bed.timings}")
        yield bed
    finally:
        bed.down()
        print(f"\ncluster test module wall time {time.monotonic() - started:.1f} s")
