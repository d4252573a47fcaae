"""The master key ring wraps labels' and appointment references' keys too:
each row names the ring key that wraps its key

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL, as every existing row gets, means "wrapped by the root key" (the
    # configured master key), which is what they are: this migration has no
    # key to re-wrap them with. The next rotation moves them onto the ring.
    for table in ("consult_labels", "appointment_references"):
        op.add_column(table, sa.Column("key_id", sa.String(16), nullable=True))


def downgrade() -> None:
    # A row wrapped by a ring key would no longer say so: refuse rather than
    # leave keys that nothing can open.
    connection = op.get_bind()
    for table in ("consult_labels", "appointment_references"):
        ring_wrapped = connection.execute(
            sa.text(f"SELECT count(*) FROM {table} WHERE key_id IS NOT NULL")  # noqa: S608
        ).scalar_one()
        if ring_wrapped:
            raise RuntimeError(
                f"{ring_wrapped} rows of {table} are wrapped by ring keys; "
                "they cannot be described without key_id"
            )
    for table in ("consult_labels", "appointment_references"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("key_id")
