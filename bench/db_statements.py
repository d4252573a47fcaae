"""The event loop's CPU per statement of a patient's way in, by path.

    .venv/bin/python bench/db_statements.py [--reads 3000] [--runs 3] [--pg postgres@127.0.0.1:5432]

One read of the invite with its consult (the ticket's and the door's
statement, ``audit/invite_use.py``), on a fresh PostgreSQL database
(``bench_db_statements``, dropped afterwards), one at a time on uvloop, as:

- ``engine``: SQLAlchemy's asyncio engine, ``reading(engine)`` (before issue 19);
- ``asyncpg Pool``: asyncpg's own pool, ``acquire``/``release`` around the
  statement's ``fetchrow`` (the row not checked: a few µs less);
- ``direct``: ``SingleStatements.reading()`` (``audit/direct.py``): our pool,
  the statement compiled once;
- ``direct, 20 at once``: the same, 20 reads asked for in one turn of the
  loop (one batched statement), per read.

Reported: µs of this process's CPU (``time.process_time``) per read, the
round trip's system calls included, PostgreSQL's own CPU not; median of the
runs. Not a test; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import sqlalchemy as sa
import uvloop

from audit.db import create_engine, reading
from audit.direct import OnConnection, SingleStatements
from audit.invite_use import _INVITE_WITH_CONSULT, open_invite_by_hash
from audit.migrate import upgrade
from audit.schema import consults, invites

DATABASE = "bench_db_statements"
INVITE_HASH = "h" * 43


async def _cpu_per_read(reads: int, step: Callable[[], Awaitable[object]], per_step: int) -> float:
    started = time.process_time()
    for _ in range(reads // per_step):
        await step()
    return (time.process_time() - started) / reads * 1e6


async def measure(args: argparse.Namespace) -> None:
    admin = await asyncpg.connect(f"postgresql://{args.pg}/postgres")
    await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
    await admin.execute(f"CREATE DATABASE {DATABASE}")
    url = f"postgresql+asyncpg://{args.pg}/{DATABASE}"
    engine = create_engine(sa.make_url(url), connect_timeout_s=5)
    single = await SingleStatements.open(engine, connect_timeout_s=5)
    pool = await asyncpg.create_pool(f"postgresql://{args.pg}/{DATABASE}", min_size=1, max_size=10)
    try:
        await upgrade(engine)
        now = datetime.now(UTC)
        consult_id = uuid.uuid4()
        async with engine.begin() as conn:
            await conn.execute(
                consults.insert().values(
                    id=consult_id, therapist_id=None, created_at=now, status="created"
                )
            )
            await conn.execute(
                invites.insert().values(
                    token_hash=INVITE_HASH,
                    consult_id=consult_id,
                    created_at=now,
                    expires_at=now + timedelta(hours=1),
                )
            )

        async def through_engine() -> object:
            async with reading(engine) as conn:
                return await open_invite_by_hash(OnConnection(conn), INVITE_HASH, now=now)

        async def through_asyncpg_pool() -> object:
            async with pool.acquire() as connection:
                return await connection.fetchrow(_INVITE_WITH_CONSULT.sql, INVITE_HASH)

        async def direct() -> object:
            async with single.reading() as db:
                return await open_invite_by_hash(db, INVITE_HASH, now=now)

        async def direct_batch() -> object:
            async with single.reading() as db:
                return await asyncio.gather(
                    *(open_invite_by_hash(db, INVITE_HASH, now=now) for _ in range(20))
                )

        paths: dict[str, tuple[Callable[[], Awaitable[object]], int]] = {
            "engine": (through_engine, 1),
            "asyncpg Pool": (through_asyncpg_pool, 1),
            "direct": (direct, 1),
            "direct, 20 at once": (direct_batch, 20),
        }
        figures: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.runs):
            for name, (step, per_step) in paths.items():  # alternating: drift hits each
                await step()  # warm: connected, statement prepared
                figures[name].append(await _cpu_per_read(args.reads, step, per_step))
        print("| path | µs of CPU per read: median [min, max] |")
        print("|---|---|")
        for name, values in figures.items():
            print(
                f"| {name} | {statistics.median(values):.0f} "
                f"[{min(values):.0f}, {max(values):.0f}] |"
            )
    finally:
        await pool.close()
        await single.close()
        await engine.dispose()
        await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--pg", default="postgres@127.0.0.1:5432", help="user@host:port (loopback, trust auth)"
    )
    uvloop.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
