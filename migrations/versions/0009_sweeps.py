"""sweeps: hyperparameter sweeps (a driver job each) and their trials as jobs (jobs.sweep_id,
jobs.trial_id).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 07:00:00
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(29), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("driver_job_id", sa.String(26), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name=op.f("fk_sweeps_owner_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
        sa.UniqueConstraint("driver_job_id", name=op.f("uq_sweeps_driver_job_id")),
        sa.UniqueConstraint("owner_id", "idempotency_key",
                            name=op.f("uq_sweeps_owner_id_idempotency_key")),
    )
    op.create_index("ix_sweeps_owner_id_id", "sweeps", ["owner_id", "id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sweep_id", sa.String(29), nullable=True))
        batch.add_column(sa.Column("trial_id", sa.String(64), nullable=True))
        batch.create_foreign_key(op.f("fk_jobs_sweep_id_sweeps"), "sweeps", ["sweep_id"], ["id"],
                                 ondelete="CASCADE")
        batch.create_unique_constraint(op.f("uq_jobs_sweep_id_trial_id"), ["sweep_id", "trial_id"])
        batch.create_index("ix_jobs_sweep_id_id", ["sweep_id", "id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_sweep_id_id")
        batch.drop_constraint(op.f("uq_jobs_sweep_id_trial_id"), type_="unique")
        batch.drop_constraint(op.f("fk_jobs_sweep_id_sweeps"), type_="foreignkey")
        batch.drop_column("trial_id")
        batch.drop_column("sweep_id")
    op.drop_index("ix_sweeps_owner_id_id", table_name="sweeps")
    op.drop_table("sweeps")
