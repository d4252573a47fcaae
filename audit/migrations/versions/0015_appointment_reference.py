"""The practice's appointment reference, sealed apart from the consult's record;
an account's external id

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN and CREATE INDEX: SQLite's batch mode would copy the
    # accounts table, which every other table refers to.
    op.add_column("accounts", sa.Column("external_id", sa.String(64), nullable=True))
    op.create_index(
        "ix_accounts_external_id", "accounts", ["organisation_id", "external_id"], unique=True
    )
    with op.batch_alter_table("practice_settings") as batch:
        batch.add_column(
            sa.Column(
                "appointment_reference_allowed",
                sa.Boolean(),
                nullable=False,
                server_default=sa.false(),
            )
        )
    op.create_table(
        "appointment_references",
        sa.Column("consult_id", sa.Uuid(), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("sealed_reference", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["consult_id"],
            ["consults.id"],
            name=op.f("fk_appointment_references_consult_id_consults"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("consult_id", name=op.f("pk_appointment_references")),
    )


def downgrade() -> None:
    op.drop_table("appointment_references")
    with op.batch_alter_table("practice_settings") as batch:
        batch.drop_column("appointment_reference_allowed")
    op.drop_index("ix_accounts_external_id", table_name="accounts")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("external_id")
