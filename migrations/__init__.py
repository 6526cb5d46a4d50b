"""Alembic migrations of the metaserve schema; run them with ``metaserve db upgrade``."""
