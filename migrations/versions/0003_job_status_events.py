"""job_status_events: every status change of a job, written with the change, so the event
stream delivers each one exactly once. Existing jobs get one row with their current status.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 07:25:00
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_status_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.String(length=26), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"],
                                name=op.f("fk_job_status_events_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_status_events")),
    )
    op.create_index("ix_job_status_events_job_id_id", "job_status_events", ["job_id", "id"])
    op.execute(
        "INSERT INTO job_status_events (job_id, status, attempt, message, error, created_at) "
        "SELECT id, status, attempt, message, error, updated_at FROM jobs ORDER BY id")


def downgrade() -> None:
    op.drop_index("ix_job_status_events_job_id_id", table_name="job_status_events")
    op.drop_table("job_status_events")
