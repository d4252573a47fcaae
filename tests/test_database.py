"""The schema comes from migrations, all or nothing, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import (
    DatabaseUnavailable,
    MigrationFailed,
    create_engine,
    current_revision,
    head_revision,
    open_database,
    prepare_data_dir,
    upgrade,
)
from audit.db import database_url as configured_url
from audit.migrate import alembic_config
from audit.schema import metadata
from tests.support.settings import SettingsFactory

FAILING_REVISION = '''
    """A migration that creates a table and then fails (for tests)."""
    import sqlalchemy as sa
    from alembic import op

    revision = "9999"
    down_revision = "{down}"
    branch_labels = None
    depends_on = None


    def upgrade() -> None:
        op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
        op.execute("INSERT INTO half_done (id) VALUES (1)")
        raise RuntimeError("migration 9999 breaks on purpose")


    def downgrade() -> None:
        pass
'''


@pytest.fixture
async def engine(
    make_settings: SettingsFactory, empty_database_url: str
) -> AsyncIterator[AsyncEngine]:
    """An engine on an empty database: these tests migrate it themselves."""
    settings = make_settings(database_url=empty_database_url)
    data_dir = prepare_data_dir(settings.data_dir)
    engine = create_engine(
        configured_url(settings, data_dir), connect_timeout_s=settings.database.connect_timeout_s
    )
    yield engine
    await engine.dispose()


@pytest.fixture
def failing_migrations(tmp_path: Path) -> Config:
    versions = tmp_path / "failing_versions"
    versions.mkdir()
    (versions / "9999_fails.py").write_text(
        textwrap.dedent(FAILING_REVISION.format(down=head_revision()))
    )
    return alembic_config(versions)


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        names = await connection.run_sync(lambda sync: sa.inspect(sync).get_table_names())
    return set(names)


async def test_upgrade_brings_an_empty_database_to_the_newest_revision(
    engine: AsyncEngine,
) -> None:
    assert await current_revision(engine) is None
    await upgrade(engine)
    assert await current_revision(engine) == head_revision()
    assert {"organisations", "alembic_version"} <= await table_names(engine)


async def test_upgrade_twice_changes_nothing(engine: AsyncEngine) -> None:
    await upgrade(engine)
    before = await table_names(engine)
    await upgrade(engine)
    assert await table_names(engine) == before
    assert await current_revision(engine) == head_revision()


async def test_migrated_schema_matches_the_table_definitions(engine: AsyncEngine) -> None:
    await upgrade(engine)

    def differences(sync: sa.Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(sync), metadata))

    async with engine.connect() as connection:
        assert await connection.run_sync(differences) == []


async def test_failed_migration_on_an_empty_database_leaves_no_table_behind(
    engine: AsyncEngine, failing_migrations: Config
) -> None:
    with pytest.raises(MigrationFailed, match="migration 9999 breaks on purpose"):
        await upgrade(engine, config=failing_migrations)
    assert await table_names(engine) == set()
    assert await current_revision(engine) is None


async def test_failed_migration_keeps_the_database_at_its_previous_revision(
    engine: AsyncEngine, failing_migrations: Config
) -> None:
    await upgrade(engine)
    async with engine.begin() as connection:
        await connection.execute(
            sa.text(
                "INSERT INTO organisations (id, name, created_at) "
                "VALUES ('0b6f3f2e-6c1d-4c36-9a51-3d1d5b1f8a10', 'Praktijk Noord', "
                "CURRENT_TIMESTAMP)"
            )
        )
    with pytest.raises(MigrationFailed):
        await upgrade(engine, config=failing_migrations)
    assert await current_revision(engine) == head_revision()
    assert "half_done" not in await table_names(engine)
    async with engine.connect() as connection:
        names = (await connection.execute(sa.text("SELECT name FROM organisations"))).scalars()
        assert list(names) == ["Praktijk Noord"]


async def test_open_database_removes_a_sqlite_file_it_created_when_migration_fails(
    make_settings: SettingsFactory, failing_migrations: Config
) -> None:
    settings = make_settings()
    data_dir = prepare_data_dir(settings.data_dir)
    with pytest.raises(MigrationFailed):
        await open_database(settings, data_dir, migrate=True, config=failing_migrations)
    assert list(data_dir.iterdir()) == []


async def test_open_database_keeps_an_existing_sqlite_file_when_migration_fails(
    make_settings: SettingsFactory, failing_migrations: Config
) -> None:
    settings = make_settings()
    data_dir = prepare_data_dir(settings.data_dir)
    engine = await open_database(settings, data_dir, migrate=True)
    await engine.dispose()
    with pytest.raises(MigrationFailed):
        await open_database(settings, data_dir, migrate=True, config=failing_migrations)
    engine = await open_database(settings, data_dir, migrate=False)
    try:
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()


async def test_unreachable_postgresql_is_named_without_its_password(
    make_settings: SettingsFactory, data_dir: Path, free_port: int
) -> None:
    settings = make_settings(
        database_url=f"postgresql+asyncpg://vc:pw-do-not-show@127.0.0.1:{free_port}/vc",
        database_connect_timeout_s=2,
    )
    with pytest.raises(DatabaseUnavailable) as caught:
        await open_database(settings, prepare_data_dir(data_dir), migrate=True)
    message = str(caught.value)
    assert f"cannot reach the database at postgresql://vc:***@127.0.0.1:{free_port}/vc" in message
    assert "pw-do-not-show" not in message
    # The public reason names neither host nor port.
    assert caught.value.reason == "connection refused"


async def test_postgresql_login_to_a_missing_database_is_reported(
    make_settings: SettingsFactory, data_dir: Path, postgres_url: str
) -> None:
    missing = postgres_url.rsplit("/", 1)[0] + "/vc_no_such_database"
    settings = make_settings(database_url=missing)
    with pytest.raises(DatabaseUnavailable, match="vc_no_such_database") as caught:
        await open_database(settings, prepare_data_dir(data_dir), migrate=True)
    assert caught.value.reason == "database does not exist"


async def test_nodes_starting_at_once_migrate_postgresql_exactly_once(
    make_settings: SettingsFactory, data_dir: Path, postgres_url: str
) -> None:
    settings = make_settings(database_url=postgres_url)
    engines = [
        create_engine(configured_url(settings, data_dir), connect_timeout_s=5) for _ in range(4)
    ]
    try:
        # Without the lock this deadlocks or fails on a duplicate table; the
        # timeout turns a hang into a failure.
        async with asyncio.timeout(30):
            await asyncio.gather(*(upgrade(engine) for engine in engines))
        assert await current_revision(engines[0]) == head_revision()
    finally:
        await asyncio.gather(*(engine.dispose() for engine in engines))
