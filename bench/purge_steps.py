"""How long appends wait while a retention purge runs on SQLite: one transaction or steps.

On SQLite a transaction holds the write lock until its commit, and every
access record (so every read of personal data) waits for it, at most the
busy timeout (5 s) before it fails. This fills one organisation's chain
with ``--records`` expired records on a SQLite file, then purges them while
a writer appends one record of another organisation every 20 ms, each in
its own transaction as the server's writer does, and reports the purge's
wall time and the appends' waits and failures. ``--mode one`` purges in
one transaction (as before ``audit.retention.purge_in_steps``), ``--mode
steps`` as the server and the command line do now; ``--mode both`` runs
each in turns, ``--runs`` times, on a fresh copy of the filled file.

    .venv/bin/python bench/purge_steps.py --records 300000 --runs 3

Not a test; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from _access_chain_setup import COLUMNS, ORG_BASE, T0, chain_batches
from sqlalchemy.engine import make_url

from audit import create_engine, upgrade
from audit.access_log import AccessRecord, ClientType, Outcome, append_access
from audit.retention import Retention, purge, purge_in_steps
from audit.schema import access_log, organisations

PURGED_ORG = uuid.UUID(int=ORG_BASE)
WRITING_ORG = uuid.UUID(int=ORG_BASE + 1)
# Everything filled is older than this retention when the purge runs.
NOW = T0 + dt.timedelta(days=400)
DEFAULTS = Retention(consult_days=730, recording_days=30, access_log_days=365)
APPEND_EVERY_S = 0.02


async def fill(path: Path, records: int) -> None:
    engine = create_engine(make_url(f"sqlite+aiosqlite:///{path}"), connect_timeout_s=30)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            await conn.execute(
                organisations.insert(),
                [
                    {"id": PURGED_ORG, "name": "purged", "created_at": T0},
                    {"id": WRITING_ORG, "name": "writing", "created_at": T0},
                ],
            )
        for rows in chain_batches(records, 20_000, 1):
            async with engine.begin() as conn:
                await conn.execute(
                    access_log.insert(), [dict(zip(COLUMNS, row, strict=True)) for row in rows]
                )
        async with engine.begin() as conn:
            await conn.execute(sa.text("ANALYZE"))
    finally:
        await engine.dispose()


def a_read(n: int) -> AccessRecord:
    return AccessRecord(
        at=NOW,
        organisation_id=WRITING_ORG,
        actor_id=None,
        actor_role="therapist",
        action="consult.read",
        object_type="consult",
        object_id=str(uuid.UUID(int=n)),
        outcome=Outcome.ALLOWED,
        client_type=ClientType.API,
    )


async def one_run(path: Path, mode: str) -> dict[str, float]:
    engine = create_engine(make_url(f"sqlite+aiosqlite:///{path}"), connect_timeout_s=5)
    waits: list[float] = []
    failed = 0
    done = asyncio.Event()

    async def writer() -> None:
        nonlocal failed
        n = 0
        while not done.is_set():
            n += 1
            started = time.perf_counter()
            try:
                async with engine.begin() as conn:
                    await append_access(conn, a_read(n))
            except sa.exc.OperationalError:
                failed += 1
            waits.append(time.perf_counter() - started)
            await asyncio.sleep(APPEND_EVERY_S)

    try:
        writing = asyncio.create_task(writer())
        await asyncio.sleep(0.5)  # the writer at its pace first
        started = time.perf_counter()
        if mode == "one":
            async with engine.begin() as conn:
                report = await purge(conn, now=NOW, defaults=DEFAULTS)
        else:
            report = await purge_in_steps(engine, now=NOW, defaults=DEFAULTS)
        took = time.perf_counter() - started
        await asyncio.sleep(0.5)
        done.set()
        await writing
    finally:
        await engine.dispose()
    waits.sort()
    return {
        "purged": report.access_log_records,
        "purge_s": took,
        "appends": len(waits),
        "append_p50_ms": 1000 * waits[len(waits) // 2],
        "append_p99_ms": 1000 * waits[min(len(waits) - 1, int(len(waits) * 0.99))],
        "append_max_ms": 1000 * waits[-1],
        "appends_failed": failed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mode", choices=["one", "steps", "both"], default="both")
    args = parser.parse_args()
    modes = ["one", "steps"] if args.mode == "both" else [args.mode]
    with tempfile.TemporaryDirectory(prefix="purge-steps-") as tmp:
        filled = Path(tmp) / "filled.db"
        print(f"filling {args.records:,} records ...", file=sys.stderr)
        asyncio.run(fill(filled, args.records))
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for run in range(args.runs):
            for mode in modes if run % 2 == 0 else modes[::-1]:
                copy = Path(tmp) / "run.db"
                shutil.copyfile(filled, copy)
                with sqlite3.connect(copy) as check:
                    check.execute("SELECT 1")
                figures = asyncio.run(one_run(copy, mode))
                results[mode].append(figures)
                print(
                    f"{mode:5} run {run + 1}: "
                    + ", ".join(f"{k} {v:,.1f}" for k, v in figures.items()),
                    flush=True,
                )
                copy.unlink()
    for mode, runs in results.items():
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{mode:5} median: " + ", ".join(f"{k} {v:,.1f}" for k, v in median.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
