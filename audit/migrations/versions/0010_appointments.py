"""Appointments: a consult's scheduled time, and the therapist's sealed label

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("consults") as batch:
        batch.add_column(sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "consult_labels",
        sa.Column("consult_id", sa.Uuid(), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("sealed_label", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["consult_id"],
            ["consults.id"],
            name=op.f("fk_consult_labels_consult_id_consults"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("consult_id", name=op.f("pk_consult_labels")),
    )


def downgrade() -> None:
    op.drop_table("consult_labels")
    with op.batch_alter_table("consults") as batch:
        batch.drop_column("scheduled_at")
