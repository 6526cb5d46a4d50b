"""jobs.metrics_kept_per_series: the budget a finished job's metrics were downsampled to by
the retention pass (service/metrics_retention.py); NULL: not yet. The pass finds its work by
it, instead of counting every finished job's points on every pass.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 08:00:00
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("metrics_kept_per_series", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("metrics_kept_per_series")
