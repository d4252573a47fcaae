"""Running the access-log walk (audit/chain_walk.py) in worker processes.

:func:`audit.access_log.verify_chain` hands a walk from an engine to this
module: each worker is ``chain_walk.py`` run as a script, the chains to
walk as JSON on its stdin (the database URL with its password goes through
the pipe, never argv), the results on its stdout. Short chains go together
to one worker; a long one is cut into consecutive parts, walked side by side
by one worker per core, and the parts joined (:func:`audit.chain_walk.join`).
Nothing here holds the event loop: the loop only waits for the pipes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import asdict, dataclass, replace

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit import chain_walk
from audit.chain_walk import WalkResult, WalkSpec, join
from audit.db import reading
from audit.errors import DatabaseError
from audit.schema import access_log


def walk_location(source: AsyncConnection | AsyncEngine) -> tuple[str, str] | None:
    """Where a worker process can read the log itself, if it can."""
    if not isinstance(source, AsyncEngine):
        return None
    url = source.url
    if url.get_backend_name() == "postgresql":
        return "postgresql", url.set(drivername="postgresql").render_as_string(hide_password=False)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return "sqlite", str(url.database)
    return None


# A chain longer than this is walked in parts, by worker processes side by
# side (one per core, at most WALKERS), and the parts joined.
SPLIT_OVER = 200_000
WALKERS = 4


# Where a chain's walk starts: its name, the first seq and its predecessor's hash.
Start = tuple[str, int, str]


@dataclass(frozen=True)
class WalkPlan:
    """How the walks go: ``batch`` records read at a time (on PostgreSQL: a
    paced walk's window), a chain longer than ``split_over`` walked in parts
    side by side, and busy at most ``share`` of the time (audit/pace.py)."""

    batch: int = 10_000
    split_over: int = SPLIT_OVER
    share: float = 1.0
    # Where the machine's paced jobs share ``share`` (audit/pace.py Peers).
    peers: str | None = None


async def walk_in_workers(
    engine: AsyncEngine, location: tuple[str, str], starts: list[Start], plan: WalkPlan
) -> list[WalkResult]:
    """Walk the chains in order, up to the first break: short ones together in
    one worker, each long one in parts; paced (``share`` below 1: workers
    side by side would take more than the share), all in one worker."""
    backend, where = location
    batch, split_over, share = plan.batch, plan.split_over, plan.share
    parts = 1 if share < 1 else max(1, min(WALKERS, os.cpu_count() or 1))
    async with reading(engine) as conn:  # on SQLite: no write lock for a read
        ends = [await _last_seq(conn, name) for name, _, _ in starts]
    results: list[WalkResult] = []
    short: list[WalkSpec] = []
    for (name, first, prev_hash), last in zip(starts, ends, strict=True):
        spec = WalkSpec(
            backend, where, name, first, prev_hash, batch, share=share, peers=plan.peers
        )
        if parts == 1 or last - first < split_over:
            short.append(spec)
            continue
        results += await _walk_in_worker(short)
        short = []
        if any(result.problem is not None for result in results):
            return results
        step = (last - first) // parts + 1
        bounds = [first + step * n for n in range(parts)]
        pieces = [
            replace(
                spec,
                start_seq=bound,
                start_hash=prev_hash if bound == first else None,
                end_seq=bound + step if n < parts - 1 else None,
            )
            for n, bound in enumerate(bounds)
        ]
        walked = await asyncio.gather(*(_walk_in_worker([piece]) for piece in pieces))
        results.append(join([part for [part] in walked]))
        if results[-1].problem is not None:
            return results
    return results + await _walk_in_worker(short)


async def _last_seq(conn: AsyncConnection, chain: str) -> int:
    found = await conn.scalar(
        sa.select(sa.func.max(access_log.c.seq)).where(access_log.c.chain == chain)
    )
    return int(found or 0)


async def _walk_in_worker(specs: list[WalkSpec]) -> list[WalkResult]:
    if not specs:
        return []
    # A process, not a thread: hashing a million records in a thread would
    # take the GIL from the event loop for up to 5 ms at a time, again and
    # again. The specs (with the database URL) go through a pipe, not argv.
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-P",
        chain_walk.__file__,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await worker.communicate(json.dumps([asdict(s) for s in specs]).encode())
    except BaseException:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        raise
    if worker.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise DatabaseError(
            f"the access-log walk failed (exit status {worker.returncode}): "
            f"{lines[-1][:300] if lines else 'no message'}"
        )
    return [WalkResult(**result) for result in json.loads(out)]
