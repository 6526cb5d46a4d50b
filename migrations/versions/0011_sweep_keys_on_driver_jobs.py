"""sweeps: the Idempotency-Key of a sweep is its driver job's (one idempotency path for every
submit, compared by the sweep's canonical config: ``jobs.spec_hash`` of a driver job becomes
its sweep's ``config_hash``); ``sweeps.idempotency_key`` goes.

A key a sweep shares with one of its owner's jobs stays only on the job (both were allowed
before; the unique key per owner on ``jobs`` cannot hold both): replaying that sweep's request
is then a 409, not a second sweep.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 01:50:00
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
        UPDATE jobs SET spec_hash = (SELECT config_hash FROM sweeps
                                     WHERE sweeps.driver_job_id = jobs.id)
        WHERE id IN (SELECT driver_job_id FROM sweeps)""")
    op.execute("""
        UPDATE jobs SET idempotency_key = (SELECT idempotency_key FROM sweeps
                                           WHERE sweeps.driver_job_id = jobs.id)
        WHERE id IN (SELECT driver_job_id FROM sweeps s WHERE s.idempotency_key IS NOT NULL
                     AND NOT EXISTS (SELECT 1 FROM jobs other
                                     WHERE other.owner_id = s.owner_id
                                     AND other.idempotency_key = s.idempotency_key))""")
    with op.batch_alter_table("sweeps") as batch:
        batch.drop_constraint(op.f("uq_sweeps_owner_id_idempotency_key"), type_="unique")
        batch.drop_column("idempotency_key")


def downgrade() -> None:
    with op.batch_alter_table("sweeps") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(200), nullable=True))
        batch.create_unique_constraint(op.f("uq_sweeps_owner_id_idempotency_key"),
                                       ["owner_id", "idempotency_key"])
    op.execute("""
        UPDATE sweeps SET idempotency_key = (SELECT idempotency_key FROM jobs
                                             WHERE jobs.id = sweeps.driver_job_id)""")
    op.execute("""
        UPDATE jobs SET idempotency_key = NULL
        WHERE id IN (SELECT driver_job_id FROM sweeps)""")
