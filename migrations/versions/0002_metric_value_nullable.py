"""metrics.value may be NULL: a non-finite value (a diverged loss) is kept as NULL instead of
failing the whole batch (SQLite stores NaN as NULL, PostgreSQL's JSON has no NaN).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 06:50:00
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("metrics") as batch:
        batch.alter_column("value", existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM metrics WHERE value IS NULL")
    with op.batch_alter_table("metrics") as batch:
        batch.alter_column("value", existing_type=sa.Float(), nullable=False)
