"""The access log becomes hash chains, one per organisation

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

Records written before this revision are chained in the order they were
written (by id), each in its organisation's chain (or the installation's),
so every chain verifies from its first record.
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
    # and the same functions must both write and verify it.
    from audit.access_log import GENESIS_HASH, canonical_fields, chain_of, record_hash
    from audit.schema import access_log

    with op.batch_alter_table("access_log") as batch:
        batch.add_column(sa.Column("chain", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("hash", sa.String(length=64), nullable=True))

    bind = op.get_bind()
    # The application's table definition: its column types read the stored
    # times and ids exactly as the application will when it verifies.
    table = access_log
    heads: dict[str, tuple[int, str]] = {}
    for row in bind.execute(sa.select(table).order_by(table.c.id)).all():
        chain = chain_of(row.organisation_id)
        seq, prev = heads.get(chain, (0, GENESIS_HASH))
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
            table.update()
            .where(table.c.id == row.id)
            .values(chain=chain, seq=seq + 1, prev_hash=prev, hash=digest)
        )
        heads[chain] = (seq + 1, digest)

    with op.batch_alter_table("access_log") as batch:
        batch.alter_column("chain", existing_type=sa.String(length=40), nullable=False)
        batch.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
        batch.create_unique_constraint(batch.f("uq_access_log_chain"), ["chain", "seq"])
        batch.create_index(batch.f("ix_access_log_hash"), ["hash"], unique=False)

    op.create_table(
        "access_log_checkpoints",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("chain", sa.String(length=40), nullable=False),
        sa.Column("through_seq", sa.BigInteger(), nullable=False),
        sa.Column("through_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("records_purged", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_log_checkpoints")),
    )
    op.create_index(
        op.f("ix_access_log_checkpoints_chain"), "access_log_checkpoints", ["chain"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_access_log_checkpoints_chain"), table_name="access_log_checkpoints")
    op.drop_table("access_log_checkpoints")
    with op.batch_alter_table("access_log") as batch:
        batch.drop_index(batch.f("ix_access_log_hash"))
        batch.drop_constraint(batch.f("uq_access_log_chain"), type_="unique")
        batch.drop_column("hash")
        batch.drop_column("prev_hash")
        batch.drop_column("seq")
        batch.drop_column("chain")
