"""Looking for what should be gone: a value anywhere in the database or the data directory."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from audit.schema import metadata
from server.app_keys import DATA_DIR, DB_ENGINE, REDIS, SETTINGS
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


async def redis_traces(harness: Harness, needles: dict[str, bytes]) -> list[str]:
    """Where any of ``needles`` is found in the app's Redis (none without one):
    every key of its database, its name and whatever its type holds."""
    client = harness.app[REDIS]
    if client is None:
        return []
    found: list[str] = []
    async for key in client.scan_iter(count=500):
        kind = _text(await client.type(key))
        if kind == "string":
            values: list[object] = [await client.get(key)]
        elif kind == "hash":
            values = [*(await client.hgetall(key)).items()]
        elif kind == "list":
            values = list(await client.lrange(key, 0, -1))
        elif kind == "set":
            values = list(await client.smembers(key))
        elif kind == "zset":
            values = list(await client.zrange(key, 0, -1))
        elif kind == "stream":
            values = list(await client.xrange(key) or [])
        else:  # "none": gone since the scan saw it
            values = []
        raw = _raw(key) + b"".join(_raw(value) for value in values)
        found += [f"{name} in {_text(key)}" for name, n in needles.items() if n in raw]
    return found


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raw(value: object) -> bytes:
    """A Redis reply's bytes, nested replies (a hash's pairs, a stream's entries) included."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, tuple | list):
        return b"".join(_raw(part) for part in value)
    if isinstance(value, dict):
        return b"".join(_raw(part) for pair in value.items() for part in pair)
    return str(value).encode()
