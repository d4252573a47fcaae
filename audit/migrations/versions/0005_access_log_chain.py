"""The access log becomes hash chains, one per organisation

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

Records written before this revision are chained in the order they were
written (by id), each in its organisation's chain (or the installation's),
so every chain verifies from its first record.

Frozen in time: the chain's rules (genesis hash, canonical fields, record
hash, chain names) and the table are copies of ``audit/access_log.py`` and
``audit/schema.py`` as they were at this revision, so that a later change to
either cannot change what a fresh install runs. The chain's encoding is a
contract: ``tests/test_database.py`` checks that today's verifier accepts
the chains this revision makes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The predecessor of the first record of a chain.
GENESIS_HASH = "0" * 64
# The chain of records that belong to no organisation (the operator's).
INSTALLATION_CHAIN = "installation"

# The access log as revision 0002 made it, with the columns this one adds.
access_log = sa.table(
    "access_log",
    sa.column("id", sa.BigInteger()),
    sa.column("at", sa.DateTime(timezone=True)),
    sa.column("organisation_id", sa.Uuid()),
    sa.column("actor_id", sa.Uuid()),
    sa.column("actor_role", sa.String()),
    sa.column("action", sa.String()),
    sa.column("object_type", sa.String()),
    sa.column("object_id", sa.String()),
    sa.column("outcome", sa.String()),
    sa.column("client_type", sa.String()),
    sa.column("chain", sa.String()),
    sa.column("seq", sa.BigInteger()),
    sa.column("prev_hash", sa.String()),
    sa.column("hash", sa.String()),
)


def chain_of(organisation_id: uuid.UUID | None) -> str:
    return str(organisation_id) if organisation_id is not None else INSTALLATION_CHAIN


def canonical_time(moment: datetime) -> str:
    # The application stores UTC; SQLite hands it back without the offset.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def canonical_fields(row: sa.Row[tuple[object, ...]]) -> dict[str, object]:
    return {
        "at": canonical_time(row.at),
        "organisation_id": str(row.organisation_id) if row.organisation_id else None,
        "actor_id": str(row.actor_id) if row.actor_id else None,
        "actor_role": row.actor_role,
        "action": row.action,
        "object_type": row.object_type,
        "object_id": row.object_id,
        "outcome": row.outcome,
        "client_type": row.client_type,
    }


def record_hash(fields: dict[str, object], prev_hash: str) -> str:
    """SHA-256 over JSON with sorted keys, no whitespace, ASCII only."""
    canonical = json.dumps(
        {**fields, "prev_hash": prev_hash}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("access_log") as batch:
        batch.add_column(sa.Column("chain", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("hash", sa.String(length=64), nullable=True))

    bind = op.get_bind()
    heads: dict[str, tuple[int, str]] = {}
    for row in bind.execute(sa.select(access_log).order_by(access_log.c.id)).all():
        chain = chain_of(row.organisation_id)
        seq, prev = heads.get(chain, (0, GENESIS_HASH))
        digest = record_hash(canonical_fields(row), prev)
        bind.execute(
            access_log.update()
            .where(access_log.c.id == row.id)
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
