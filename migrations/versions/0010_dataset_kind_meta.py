"""datasets: kind (images or table) and meta (what submit checks a spec against); a table
has no classes, images or image shape.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 01:30:00
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False,
                                   server_default="images"))
        batch.add_column(sa.Column("meta", sa.JSON(), nullable=True))
        batch.alter_column("classes", existing_type=sa.Integer(), nullable=True)
        batch.alter_column("images", existing_type=sa.BigInteger(), nullable=True)
        batch.alter_column("shape", existing_type=sa.JSON(), nullable=True)
        batch.create_check_constraint(op.f("ck_datasets_kind"), "kind IN ('images', 'table')")


def downgrade() -> None:
    op.execute("DELETE FROM datasets WHERE kind = 'table'")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_constraint(op.f("ck_datasets_kind"), type_="check")
        batch.alter_column("shape", existing_type=sa.JSON(), nullable=False)
        batch.alter_column("images", existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column("classes", existing_type=sa.Integer(), nullable=False)
        batch.drop_column("meta")
        batch.drop_column("kind")
