"""How long one full garbage collection stalls a ``metaserve serve`` process, with and without
``gc.freeze`` of the start-up objects (``api/app.py``, ``_freeze_startup_objects``).

The job drivers left the API process (one supervisor actor per job on Ray), so this asks
whether the freeze is still needed: the process still holds Ray's driver (its dispatcher) and
torch (the cost model checks each submitted spec). The app is built as ``metaserve serve``
builds it (embedded default: SQLite, local Ray, dispatcher inside), one job submitted, then
``gc.collect()`` is timed 5 times before and 5 times after ``gc.freeze()``.

    python benchmarks/gc_pause.py   # -> benchmarks/results/gc_pause.json
"""

from __future__ import annotations

import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "gc_pause.json"
RAY_READY_TIMEOUT_S = 180.0
COLLECTIONS = 5
SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}, "iterations": 2}


def full_collection_ms() -> list[float]:
    pauses = []
    for _ in range(COLLECTIONS):
        began = time.perf_counter()
        gc.collect()
        pauses.append(round((time.perf_counter() - began) * 1000, 1))
    return pauses


def main() -> None:
    from fastapi.testclient import TestClient

    from metaserve.api.app import create_app
    from metaserve.service.migrate import upgrade
    from metaserve.service.settings import Settings

    directory = Path(tempfile.mkdtemp(prefix="metaserve-gc-"))
    url = f"sqlite:///{directory / 'metaserve.db'}"
    upgrade(url)
    app = create_app(Settings(database_url=url, artifact_root=str(directory / "artifacts")))
    with TestClient(app) as client:
        deadline = time.monotonic() + RAY_READY_TIMEOUT_S
        while not app.state.dispatcher.ray_ready.is_set() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert client.post("/v1/jobs", json=SPEC).status_code in (201, 401)
        tracked = len(gc.get_objects())
        unfrozen = full_collection_ms()
        gc.freeze()
        frozen = full_collection_ms()
        result = {"tracked_objects": tracked, "full_collection_ms_unfrozen": unfrozen,
                  "full_collection_ms_frozen": frozen, "frozen_objects": gc.get_freeze_count(),
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  "load_average_1m": round(os.getloadavg()[0], 2),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
