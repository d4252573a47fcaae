"""Databases at the current schema, migrated once per test session and copied for each test.

Migrating a new database takes 0.2 to 1 s (a PostgreSQL database also has to
be created), and some 550 tests start an app on one. So a session migrates
one SQLite file and one PostgreSQL database, with the code under test, and
each test gets a copy: a file copy, or ``CREATE DATABASE ... TEMPLATE``. The
app's own start then finds the schema at head and migrates nothing. Tests
about migrating ask for an empty database instead (``empty_database_url``).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from audit.db import SQLITE_FILE_NAME
from audit.migrate import open_database
from config import load_settings
from tests.support.services import asyncpg_dsn

T = TypeVar("T")

QUICK_ON_SQLITE = pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)], indirect=True
)
"""For a test of a request refused before anything is stored: the quick check
(``-m "not slow"``) runs it on SQLite only, the whole suite on both databases,
as ``database_url`` always does."""


def run_outside_the_test_loop(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a loop of its own in another thread: session
    fixtures must neither use nor replace the event loop of a test."""

    async def main() -> T:
        return await make()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()


async def migrate(data_dir: Path, database_url: str = "") -> None:
    """Bring the database of these settings (SQLite in ``data_dir`` when no URL) to head."""
    environ = {"VIDEOCONSULT_DATA_DIR": str(data_dir)}
    if database_url:
        environ["VIDEOCONSULT_DATABASE_URL"] = database_url
    engine = await open_database(load_settings(environ), data_dir, migrate=True)
    await engine.dispose()


def make_sqlite_template(directory: Path) -> Path:
    """Migrate a SQLite database in ``directory``; return its file."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_outside_the_test_loop(lambda: migrate(directory))
    return directory / SQLITE_FILE_NAME


def copy_sqlite_template(template: Path, data_dir: Path) -> None:
    """Put a copy of the template where the app in ``data_dir`` looks for its database."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    copy = data_dir / SQLITE_FILE_NAME
    shutil.copyfile(template, copy)
    copy.chmod(0o600)


async def create_database(admin_url: str, *, template: str | None = None) -> str:
    """Create a database with a new name (empty, or a copy of the database
    ``template`` names, by URL); return its URL."""
    name = f"vc_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(asyncpg_dsn(admin_url), timeout=5)
    try:
        if template is None:
            await admin.execute(f'CREATE DATABASE "{name}"')
        else:
            source = make_url(template).database
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
        # A commit then returns before its WAL reaches the disk (a few ms
        # each on a busy machine, dozens of commits a test). What others see
        # is the same; only a crash of the server could lose the last
        # commits, and no test crashes the shared server (the drills start
        # their own, tests/support/own_postgres.py).
        await admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    finally:
        await admin.close()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(admin_url: str, url: str) -> None:
    """Drop the database of ``url``, closing whatever is still connected to it."""
    admin = await asyncpg.connect(asyncpg_dsn(admin_url), timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
    finally:
        await admin.close()


async def make_postgres_template(admin_url: str, data_dir: Path) -> str:
    """Create and migrate a PostgreSQL database for copies; return its URL."""
    url = await create_database(admin_url)
    try:
        await migrate(data_dir, url)
    except BaseException:
        await drop_database(admin_url, url)
        raise
    return url


class PostgresCopies:
    """Copies of a template database, made ahead in threads and dropped behind.

    ``CREATE DATABASE`` and ``DROP DATABASE`` each wait for the server to sync
    its files (0.2 to 1 s here); done in two threads of their own, they mostly
    overlap the tests before and after instead of adding to them.
    """

    def __init__(self, admin_url: str, template_url: str, *, ahead: int = 2) -> None:
        self._admin_url = admin_url
        self._template_url = template_url
        self._ahead = ahead
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pg-copies")
        self._made: deque[Future[str]] = deque()
        self._drops: list[Future[None]] = []

    def _submit_copy(self) -> None:
        self._made.append(
            self._pool.submit(
                asyncio.run, create_database(self._admin_url, template=self._template_url)
            )
        )

    async def take(self) -> str:
        """A database of its own for one test (its URL); hand it back with :meth:`drop`."""
        while len(self._made) < self._ahead + 1:
            self._submit_copy()
        return await asyncio.wrap_future(self._made.popleft())

    def drop(self, url: str) -> None:
        """Drop the database in the background."""
        self._drops.append(self._pool.submit(asyncio.run, drop_database(self._admin_url, url)))

    def close(self) -> None:
        """Drop the copies made ahead, wait for every drop; raise the first error."""
        for made in self._made:
            self.drop(made.result())
        self._made.clear()
        self._pool.shutdown(wait=True)
        for dropped in self._drops:
            dropped.result()


# What asyncpg runs on a connection to learn a type it has no codec for yet
# (arrays): its JIT switched off for it, the type tree, the JIT back.
ASYNCPG_INTROSPECTION = (
    "SELECT current_setting('jit')",
    "WITH RECURSIVE typeinfo_tree",
    "SELECT set_config('jit'",
)
