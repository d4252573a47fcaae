"""Alembic environment: runs on the connection that audit.migrate hands over."""

from __future__ import annotations

from alembic import context

# Today's tables, as the target of autogenerate only: an upgrade never reads
# them. The revisions import nothing of the project; each carries copies of
# what it needs (tests/test_database.py runs them with today's code away).
from audit.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `videoconsult db upgrade`, not the alembic command")

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things in place; batch mode rebuilds tables.
    render_as_batch=connection.dialect.name == "sqlite",
    # audit.db makes SQLite DDL transactional; the whole upgrade is one transaction.
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
