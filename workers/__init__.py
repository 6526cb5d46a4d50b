"""The engine, what runs on Ray: specs, algorithms, task families, networks, the training loop,
the job runner and supervisor, meta-RL, sweeps' trials, checkpoints and artifacts.

This folder, ``workers/``, installs as ``metaserve.workers`` (pyproject.toml's ``package-dir``):
read ``from metaserve.workers.x import y`` as ``workers/x.py``. It imports nothing of
``metaserve.service`` or ``metaserve.api`` and works as a library without a server
(docs/ARCHITECTURE.md; ``tests/test_import_graph.py`` checks it).
"""
