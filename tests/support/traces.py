"""Looking for what should be gone: a value anywhere in the database or the data directory."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from audit.schema import metadata
from server.app_keys import DATA_DIR, DB_ENGINE, SETTINGS
from tests.support.harness import Harness


async def traces(harness: Harness, needles: dict[str, bytes]) -> list[str]:
    """Where any of ``needles`` is still found: every table of the database
    (every row, as the driver returns it), and for SQLite every file of the
    data directory byte by byte (the database file, free pages included)."""
    found: list[str] = []
    async with harness.app[DB_ENGINE].connect() as conn:
        for table in metadata.sorted_tables:
            for row in (await conn.execute(sa.select(table))).all():
                for value in row:
                    raw = value if isinstance(value, bytes) else str(value).encode()
                    found += [f"{name} in {table.name}" for name, n in needles.items() if n in raw]
    if harness.app[SETTINGS].database.url == "":
        await harness.app[DB_ENGINE].dispose()  # nothing held back in a connection
        for path in sorted(Path(harness.app[DATA_DIR]).rglob("*")):
            if path.is_file():
                content = path.read_bytes()
                found += [f"{name} in {path.name}" for name, n in needles.items() if n in content]
    return found
