"""Consent and stop reason of recordings; the master key ring

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("recordings") as batch:
        batch.add_column(sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("consented_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("consent_by", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("stop_reason", sa.String(length=32), nullable=True))
    op.create_table(
        "master_keys",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_master_keys")),
    )


def downgrade() -> None:
    op.drop_table("master_keys")
    with op.batch_alter_table("recordings") as batch:
        batch.drop_column("stop_reason")
        batch.drop_column("consent_by")
        batch.drop_column("consented_at")
        batch.drop_column("requested_at")
