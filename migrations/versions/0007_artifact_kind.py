"""artifact kind: reserved for the work in progress on this revision (no schema change yet).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 06:40:00
"""

from __future__ import annotations

from typing import Sequence

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
