"""Apply the Alembic migrations in ``audit/migrations`` to a database.

The whole upgrade runs in one transaction: on failure nothing of it stays,
on PostgreSQL and on SQLite alike (see :mod:`audit.db`).
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.db import check_connection, create_engine, database_url, first_line, reading
from audit.errors import MigrationFailed, SchemaOutOfDate
from config import Settings

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The advisory lock that serialises migrations on PostgreSQL ("vcmigrat").
_LOCK_KEY = int.from_bytes(b"vcmigrat", "big") >> 1


def alembic_config(*extra_version_locations: Path) -> Config:
    """Return the Alembic configuration; extra locations are for tests."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if extra_version_locations:
        locations = [MIGRATIONS_DIR / "versions", *extra_version_locations]
        config.set_main_option("version_locations", " ".join(str(p) for p in locations))
        config.set_main_option("path_separator", "space")
    return config


def head_revision(config: Config | None = None) -> str:
    """Return the newest revision the code knows."""
    head = ScriptDirectory.from_config(config or alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise MigrationFailed("no migrations found")
    return head


async def current_revision(engine: AsyncEngine) -> str | None:
    """Return the revision the database is at, or None when it has none."""

    def _current(connection: sa.Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    # A read: on SQLite no write lock, so that a command that only reads
    # does not wait for a writer at its schema check.
    async with reading(engine) as connection:
        return await connection.run_sync(_current)


async def upgrade(engine: AsyncEngine, *, config: Config | None = None, to: str = "head") -> None:
    """Bring the schema to the newest revision (or ``to``), all or nothing."""
    config = config or alembic_config()

    def _upgrade(connection: sa.Connection) -> None:
        if connection.dialect.name == "postgresql":
            # Several nodes may start at once: one migrates, the others wait
            # for its commit and then find nothing left to do.
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, to)

    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade)
    except Exception as err:
        raise MigrationFailed(
            f"schema migration failed and was rolled back: {first_line(err)}"
        ) from err


async def open_database(
    settings: Settings, data_dir: Path, *, migrate: bool, config: Config | None = None
) -> AsyncEngine:
    """Connect to the configured database and, if asked, bring its schema up to date.

    Raises :class:`DatabaseUnavailable` or :class:`MigrationFailed`. On failure
    no engine is left open, and a SQLite file this call created is removed
    again, so a failed start never leaves a half-created database behind.
    """
    url = database_url(settings, data_dir)
    new_sqlite_file = missing_sqlite_file(url)
    engine = create_engine(url, connect_timeout_s=settings.database.connect_timeout_s)
    try:
        await check_connection(engine, timeout_s=settings.database.connect_timeout_s)
        if migrate:
            await upgrade(engine, config=config)
    except BaseException:
        await engine.dispose()
        if new_sqlite_file is not None:
            for leftover in (new_sqlite_file, Path(f"{new_sqlite_file}-journal")):
                leftover.unlink(missing_ok=True)
        raise
    return engine


def missing_sqlite_file(url: URL) -> Path | None:
    """Return the SQLite file ``url`` names if it does not exist yet."""
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    path = Path(url.database)
    return None if path.exists() else path


async def ensure_current(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaOutOfDate` unless the schema is at the newest revision."""
    revision, head = await current_revision(engine), head_revision()
    if revision != head:
        raise SchemaOutOfDate(
            f"the database schema is at revision {revision or 'none'}, this version "
            f"needs {head}: run `videoconsult db upgrade`"
        )
