"""The tables, as SQLAlchemy Core metadata. Alembic migrations create them.

Every change here comes with a new revision in ``audit/migrations/versions``;
``tests/test_migrations.py`` fails when the two drift apart.
"""

from __future__ import annotations

import sqlalchemy as sa

# Stable constraint names, so that migrations can refer to them on every backend.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# A practice or clinic. Every professional account belongs to exactly one,
# and every view is limited to the viewer's own organisation.
organisations = sa.Table(
    "organisations",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("name"),
)
