"""jobs.interruptions: handbacks of a running job that were no fault of its own (a drained
dispatcher, a lost node, database or Ray head); they never consume ``attempt``.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 04:30:00
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("interruptions", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.create_check_constraint(op.f("ck_jobs_interruptions_non_negative"),
                                     "interruptions >= 0")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_interruptions_non_negative"), type_="check")
        batch.drop_column("interruptions")
