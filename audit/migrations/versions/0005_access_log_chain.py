"""The access log becomes a hash chain

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

Records written before this revision are chained in the order they were
written (by id), so the whole log verifies from its first record.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Imported here: the canonical encoding is part of the chain's contract,
    # and the same function must both write and verify it.
    from audit.access_log import GENESIS_HASH, canonical_fields, record_hash
    from audit.schema import access_log

    with op.batch_alter_table("access_log") as batch:
        batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("hash", sa.String(length=64), nullable=True))

    bind = op.get_bind()
    # The application's table definition: its column types read the stored
    # times and ids exactly as the application will when it verifies.
    table = access_log
    prev = GENESIS_HASH
    rows = bind.execute(sa.select(table).order_by(table.c.id)).all()
    for seq, row in enumerate(rows, start=1):
        fields = canonical_fields(
            at=row.at,
            organisation_id=row.organisation_id,
            actor_id=row.actor_id,
            actor_role=row.actor_role,
            action=row.action,
            object_type=row.object_type,
            object_id=row.object_id,
            outcome=row.outcome,
            client_type=row.client_type,
        )
        digest = record_hash(fields, prev)
        bind.execute(
            table.update().where(table.c.id == row.id).values(seq=seq, prev_hash=prev, hash=digest)
        )
        prev = digest

    with op.batch_alter_table("access_log") as batch:
        batch.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
        batch.create_unique_constraint(batch.f("uq_access_log_seq"), ["seq"])
        batch.create_index(batch.f("ix_access_log_hash"), ["hash"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("access_log") as batch:
        batch.drop_index(batch.f("ix_access_log_hash"))
        batch.drop_constraint(batch.f("uq_access_log_seq"), type_="unique")
        batch.drop_column("hash")
        batch.drop_column("prev_hash")
        batch.drop_column("seq")
