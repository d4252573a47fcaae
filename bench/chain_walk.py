"""The access-log walk's CPU per record, in one process, on a SQLite file.

What a verify's worker process does (``audit/chain_walk.py``: read the rows,
make each one's canonical text, hash it, check the link), timed alone, without
worker processes, the event loop or a second core's noise: CPU seconds of this
process per record, medians of ``--runs``. ``--compare FILE`` times another
copy of ``chain_walk.py`` (another commit's: ``git show REV:audit/chain_walk.py
> FILE``) in turns with this checkout's, on the same file.

    .venv/bin/python bench/chain_walk.py --records 300000 --runs 5 \\
        --compare /tmp/chain_walk_before.py

The file (one chain, the records of ``bench/_access_chain_setup.py``) is made
once and kept at ``--file`` for the next invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from _access_chain_setup import COLUMNS, chain_batches
from sqlalchemy.engine import make_url

from audit import chain_walk, create_engine, upgrade
from audit.schema import access_log


async def fill(path: Path, records: int) -> None:
    engine = create_engine(make_url(f"sqlite+aiosqlite:///{path}"), connect_timeout_s=30)
    try:
        await upgrade(engine)
        for rows in chain_batches(records, 20_000, 1):
            async with engine.begin() as conn:
                await conn.execute(
                    access_log.insert(), [dict(zip(COLUMNS, row, strict=True)) for row in rows]
                )
        async with engine.begin() as conn:
            await conn.execute(sa.text("ANALYZE"))
    finally:
        await engine.dispose()


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--file", type=Path, default=Path(__file__).parent / "results" / "chain-walk.db"
    )
    parser.add_argument("--compare", type=Path, help="another copy of audit/chain_walk.py")
    args = parser.parse_args()

    path: Path = args.file
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        try:
            count = conn.execute("SELECT count(*) FROM access_log").fetchone()[0]
        except sqlite3.OperationalError:
            count = 0
    if count != args.records:
        path.unlink(missing_ok=True)
        print(f"bench: writing {args.records:,} records to {path} ...", flush=True)
        asyncio.run(fill(path, args.records))
    with sqlite3.connect(path) as conn:
        chain = conn.execute("SELECT chain FROM access_log LIMIT 1").fetchone()[0]

    walks: dict[str, ModuleType] = {"this checkout": chain_walk}
    if args.compare is not None:
        walks = {str(args.compare): load("chain_walk_compared", args.compare), **walks}
    cpu: dict[str, list[float]] = {name: [] for name in walks}
    for _ in range(args.runs):
        for name, module in walks.items():
            spec = module.WalkSpec("sqlite", str(path), chain, 1, None, 10_000)
            started = time.process_time()
            [result] = module.walk([spec])
            cpu[name].append(time.process_time() - started)
            if result.problem is not None or result.records != args.records:
                print(f"bench: {name}: {result}", file=sys.stderr)
                return 1
    for name, seconds in cpu.items():
        each = ", ".join(f"{1e6 * s / args.records:.2f}" for s in seconds)
        median = 1e6 * statistics.median(seconds) / args.records
        print(f"{name}: {median:.2f} µs of CPU per record (median; runs: {each})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
