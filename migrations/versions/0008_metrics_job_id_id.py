"""Read indexes of the metrics table: (job_id, id) for the rows in id order (event streams
read them after a cursor; the job watch reads each watched job's last one), and (job_id, step,
name) for ``GET /v1/jobs/{id}/metrics`` pages ordered by (step, name), which otherwise sort
every row of the job for each page.

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
    op.create_index("ix_metrics_job_id_step_name", "metrics", ["job_id", "step", "name"])


def downgrade() -> None:
    op.drop_index("ix_metrics_job_id_step_name", table_name="metrics")
    op.drop_index("ix_metrics_job_id_id", table_name="metrics")
