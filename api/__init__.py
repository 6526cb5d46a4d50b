"""The HTTP layer: the FastAPI app, its routes, schemas, auth dependency and error mapping.

This folder, ``api/``, installs as ``metaserve.api`` (pyproject.toml's ``package-dir``): read
``from metaserve.api.x import y`` as ``api/x.py``. Layers import one way, ``api -> service ->
workers`` (docs/ARCHITECTURE.md; ``tests/test_import_graph.py`` checks it).
"""
