"""The schema comes from migrations, all or nothing, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import ast
import asyncio
import os
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
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
from audit.access_log import verify_chain
from audit.db import database_url as configured_url
from audit.migrate import MIGRATIONS_DIR, alembic_config
from audit.schema import access_log, metadata
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


async def schema_differences(engine: AsyncEngine) -> list[object]:
    """What the database's schema lacks or has beyond the table definitions of today."""

    def differences(sync: sa.Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(sync), metadata))

    async with engine.connect() as connection:
        return await connection.run_sync(differences)


async def test_migrated_schema_matches_the_table_definitions(engine: AsyncEngine) -> None:
    await upgrade(engine)
    assert await schema_differences(engine) == []


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


# --------------------------------------------------------------------------
# Migrations are frozen in time: a revision carries copies of what it needs,
# so that a later change to the schema or the domain code cannot change what
# a fresh install runs.
# --------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
REVISIONS = sorted((MIGRATIONS_DIR / "versions").glob("*.py"))
PROJECT_PACKAGES = frozenset(path.parent.name for path in ROOT.glob("*/__init__.py"))

# Runs the real migration runner (audit.migrate, audit.db, config) with
# every other module of the project replaced by a stand-in that fails when a
# migration uses it. env.py names the schema as the target of autogenerate,
# which an upgrade never reads: an empty one stands in for it.
UPGRADE_WITHOUT_TODAYS_CODE = """
import asyncio
import sys
import types
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

import audit
from audit.db import create_engine
from audit.migrate import upgrade


class TodaysModule(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):  # the import system's probes (__path__)
            raise AttributeError(name)
        raise ImportError(f"a migration used today's {self.__name__}.{name}")


runner = set(sys.modules)
stand_ins = ["server", "signaling", "tests"] + [
    f"audit.{path.stem}" for path in Path(audit.__file__).parent.glob("*.py")
]
for name in stand_ins:
    if name in {"audit.schema", "audit.access_log"} and name in runner:
        sys.exit(f"the migration runner itself imports {name}; this test cannot replace it")
    if name in runner:
        continue
    sys.modules[name] = TodaysModule(name)
    package, _, child = name.rpartition(".")
    if package:
        setattr(sys.modules[package], child, sys.modules[name])
sys.modules["audit.schema"].metadata = sa.MetaData()


async def main(url: str, revision: str) -> None:
    engine = create_engine(make_url(url), connect_timeout_s=10)
    try:
        await upgrade(engine, to=revision)
    finally:
        await engine.dispose()


asyncio.run(main(*sys.argv[1:]))
"""

PRACTICES = (uuid.UUID(int=0x0B01), uuid.UUID(int=0x0B02), None)


def records_before_the_chain() -> list[dict[str, object]]:
    """Records of two organisations and of the operator, interleaved, as the
    application wrote them before revision 0005 (times in UTC)."""
    start = datetime(2026, 11, 20, 23, 59, 58, 123456, tzinfo=UTC)
    return [
        {
            "at": start + timedelta(seconds=n, microseconds=n),
            "organisation_id": PRACTICES[n % 3],
            "actor_id": None if PRACTICES[n % 3] is None else uuid.UUID(int=0x0A00 + n),
            "actor_role": "operator" if PRACTICES[n % 3] is None else "admin",
            "action": "account.create",
            "object_type": "account",
            "object_id": None if n == 4 else str(uuid.UUID(int=0x0C00 + n)),
            "outcome": "refused" if n == 5 else "allowed",
            "client_type": "cli" if PRACTICES[n % 3] is None else "api",
        }
        for n in range(8)
    ]


async def upgrade_without_todays_code(engine: AsyncEngine, revision: str) -> None:
    """Upgrade ``engine``'s database in a process where the project's domain
    modules fail on use; fail the test with that process's error."""
    environ = dict(os.environ)
    # Far from UTC: a migration that read SQLite's offset-less times as local
    # times would hash other times than the application verifies.
    environ["TZ"] = "XST-13:45"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        UPGRADE_WITHOUT_TODAYS_CODE,
        engine.url.render_as_string(hide_password=False),
        revision,
        cwd=ROOT,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode(errors="replace")


def imported_modules(revision: Path) -> set[str]:
    """The modules ``revision`` imports, wherever in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(revision.read_text(), str(revision))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_project_packages_are_known() -> None:
    assert {"audit", "config", "server", "signaling", "tests"} <= PROJECT_PACKAGES


@pytest.mark.parametrize("revision", REVISIONS, ids=lambda path: path.stem)
def test_no_migration_imports_the_project(revision: Path) -> None:
    project = {
        name
        for name in imported_modules(revision)
        if name.startswith(".") or name.split(".")[0] in PROJECT_PACKAGES
    }
    assert project == set(), f"{revision.name} imports today's code: {sorted(project)}"


async def test_every_migration_runs_from_empty_without_todays_code(engine: AsyncEngine) -> None:
    await upgrade_without_todays_code(engine, "0004")
    legacy = records_before_the_chain()
    async with engine.begin() as connection:
        # The columns revision 0002 made: as the application wrote them then.
        await connection.execute(access_log.insert(), legacy)
    await upgrade_without_todays_code(engine, "head")

    assert await current_revision(engine) == head_revision()
    assert await schema_differences(engine) == []
    # The chains revision 0005 made of the older records verify with today's code.
    async with engine.connect() as connection:
        report = await verify_chain(connection)
    assert report.intact, report.broken
    assert (report.records, report.chains) == (len(legacy), len(PRACTICES))


async def test_a_leaked_asyncpg_connection_is_collected_at_its_own_tests_end(
    postgres_url: str,
) -> None:
    """The suite's guard against asyncpg's known leak on cancellation
    (tests/conftest.py): such a connection is let go where it was made, and
    any other unraisable still reaches pytest."""
    import asyncpg

    from tests.conftest import collect_leaked_asyncpg_connections

    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")
    connection = await asyncpg.connect(dsn)
    transport = connection._transport  # closed below, as the loop's end would
    # Never closed, as a task cancelled in close() leaves it, and held in a
    # cycle (as a cancelled task's frame holds it): only the collector frees it.
    holder: list[object] = [connection]
    holder.append(holder)
    del connection, holder
    seen: list[str] = []
    original = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: seen.append(str(unraisable.exc_value))
    try:
        assert collect_leaked_asyncpg_connections() == 1

        class Noisy:
            def __del__(self) -> None:
                raise RuntimeError("not asyncpg's")

        noisy: list[object] = [Noisy()]
        noisy.append(noisy)  # a cycle: only the collector frees it
        del noisy
        assert collect_leaked_asyncpg_connections() == 0
    finally:
        sys.unraisablehook = original
        transport.close()
    assert seen == ["not asyncpg's"]
