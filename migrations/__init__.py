"""Alembic migrations of the metaserve schema; run them with ``metaserve db upgrade``.

This folder, ``migrations/``, installs as ``metaserve.migrations`` (pyproject.toml's
``package-dir``); see docs/ARCHITECTURE.md.
"""
