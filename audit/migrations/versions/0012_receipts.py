"""The patient's receipt: token hashes per consult, destroyed recordings, and
an index on the access log's object

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
# Other branches of this wave may add revisions too; the lead re-chains at merge.
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receipts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("consult_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["consult_id"],
            ["consults.id"],
            name=op.f("fk_receipts_consult_id_consults"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_receipts")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_receipts_token_hash")),
    )
    op.create_index(op.f("ix_receipts_consult_id"), "receipts", ["consult_id"])
    op.create_table(
        "destroyed_recordings",
        sa.Column("recording_id", sa.Uuid(), nullable=False),
        sa.Column("consult_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["consult_id"],
            ["consults.id"],
            name=op.f("fk_destroyed_recordings_consult_id_consults"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("recording_id", name=op.f("pk_destroyed_recordings")),
    )
    op.create_index(
        op.f("ix_destroyed_recordings_consult_id"), "destroyed_recordings", ["consult_id"]
    )
    op.create_index(op.f("ix_access_log_object_id"), "access_log", ["object_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_access_log_object_id"), table_name="access_log")
    op.drop_index(op.f("ix_destroyed_recordings_consult_id"), table_name="destroyed_recordings")
    op.drop_table("destroyed_recordings")
    op.drop_index(op.f("ix_receipts_consult_id"), table_name="receipts")
    op.drop_table("receipts")
