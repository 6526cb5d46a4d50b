"""The domain: settings, tables and sessions, the job store and claims, the dispatcher, datasets,
sweeps, the artifact store's server side, adaptation, telemetry.

This folder, ``service/``, installs as ``metaserve.service`` (pyproject.toml's ``package-dir``):
read ``from metaserve.service.x import y`` as ``service/x.py``. It imports ``metaserve.workers``,
never ``metaserve.api`` (docs/ARCHITECTURE.md; ``tests/test_import_graph.py`` checks it).
"""
