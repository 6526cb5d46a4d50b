"""metrics(job_id, id) index: a job's metric rows in id order (event streams read them after a
cursor; the job watch reads each watched job's last one) without visiting its other rows.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 07:30:00
"""

from __future__ import annotations

from typing import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_metrics_job_id_id", "metrics", ["job_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_metrics_job_id_id", table_name="metrics")
