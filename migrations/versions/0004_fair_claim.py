"""Fair claim: users.last_claimed_at (the round-robin turn of each user) and the index
jobs(status, owner_id, id) (each user's oldest queued job and running count).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 09:00:00
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("last_claimed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_status_owner_id_id", "jobs", ["status", "owner_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_owner_id_id", table_name="jobs")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("last_claimed_at")
