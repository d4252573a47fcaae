"""Group commit for the access log: one transaction chains a batch of queued records.

Appending one record per transaction made the log a serial bottleneck: each
append waits for the chain's lock (PostgreSQL: an advisory lock; SQLite: its
single writer) and a commit of its own. :class:`AccessLogWriter` queues the
records of every caller in the process; one task at a time takes all that
are queued (up to ``max_batch``), chains them in one transaction
(:func:`audit.access_log.append_records`, under the same locks, so that
other nodes and in-transaction appends stay on one correct chain) and
commits. Each caller's :meth:`AccessLogWriter.append` returns only once its
record is committed; when the batch's transaction fails, every caller of
that batch gets :class:`audit.errors.AccessLogNotWritten` and must not
answer the read it meant to record. Nothing is lost silently.

On PostgreSQL each chain has a queue and a writing task of its own: a chain
whose lock another transaction holds (the retention purge keeps each chain
it touched locked until it commits) stalls the reads of its own
organisation only, never another's. At most ``max_concurrent`` chains'
transactions are open at once, so that the writer never takes more of the
pool than that; a batch tries its chain's lock and, held, gives its slot
back and tries again a moment later (5 ms, doubling to 200 ms), so that held
chains never hold the slots other chains need. On SQLite, whose one writer
every transaction waits for anyway, one queue takes every chain's records,
as one transaction.

Records that must commit with a change (no change without its record) are
still appended with :func:`audit.access_log.record_access` in the change's
own transaction; the writer is for reads, whose record must be committed
before the answer goes out.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from audit.access_log import (
    AccessRecord,
    Actor,
    ChainBusy,
    Outcome,
    access_record,
    append_records,
    chain_of,
)
from audit.db import first_line
from audit.errors import AccessLogNotWritten

# Enough to carry 32 concurrent writers' records in one transaction several
# times over; small enough that hashing a batch on the loop takes about a
# millisecond.
MAX_BATCH = 256
# Chains written at once: each holds a pooled connection while it writes.
MAX_CONCURRENT = 4
# How long a batch whose chain is held waits before it tries again, doubling
# up to the most.
BUSY_PAUSE_S = 0.005
MAX_BUSY_PAUSE_S = 0.2

_Queued = list[tuple[AccessRecord, "asyncio.Future[None]"]]


class AccessLogWriter:
    """Appends access records in batches; create it with the engine, close it before disposing."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch: int = MAX_BATCH,
        max_concurrent: int = MAX_CONCURRENT,
    ) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._slots = asyncio.Semaphore(max_concurrent)
        # Per chain: the records waiting, and the task that writes them.
        self._queues: dict[str, _Queued] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        self._per_chain = engine.dialect.name != "sqlite"
        # Figures for /metrics and the benchmark.
        self.batches = 0
        self.records = 0

    async def append(self, record: AccessRecord) -> None:
        """Queue ``record``; return when the transaction that chains it has committed.

        Raises :class:`AccessLogNotWritten` when that transaction failed.
        Cancelling the caller does not take the record back: it is written.
        """
        if self._closed:
            raise AccessLogNotWritten("the access log writer is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        chain = chain_of(record.organisation_id) if self._per_chain else ""
        self._queues.setdefault(chain, []).append((record, future))
        if chain not in self._tasks:
            self._tasks[chain] = asyncio.create_task(
                self._write_queued(chain), name="access-log-writer"
            )
        await asyncio.shield(future)

    async def record(
        self,
        actor: Actor,
        *,
        organisation_id: uuid.UUID | None,
        action: str,
        object_type: str,
        object_id: uuid.UUID | str | None,
        now: datetime,
        outcome: Outcome = Outcome.ALLOWED,
    ) -> None:
        """Append ``actor``'s access record (as :func:`audit.access_log.record_access`
        does, but in a batch); return once it is committed. Call it before
        answering the read it records."""
        await self.append(
            access_record(
                actor,
                organisation_id=organisation_id,
                action=action,
                object_type=object_type,
                object_id=object_id,
                now=now,
                outcome=outcome,
            )
        )

    async def close(self) -> None:
        """Write what is queued, then refuse new records. Should be called before the
        engine is disposed."""
        self._closed = True
        while self._tasks:
            await asyncio.shield(asyncio.gather(*self._tasks.values(), return_exceptions=True))

    async def _write_queued(self, chain: str) -> None:  # "": every chain (SQLite)
        # While one batch commits, the next queues up: the batch size follows
        # the load by itself, with no timer to wait for.
        queue = self._queues[chain]
        pause_s = BUSY_PAUSE_S
        try:
            while queue:
                async with self._slots:
                    batch = queue[: self._max_batch]
                    del queue[: self._max_batch]
                    busy = await self._write(batch)
                    if busy:  # back to the front, in order, for the next try
                        queue[0:0] = batch
                if busy:
                    # The chain is held (the retention purge, till it commits):
                    # wait without a slot, so other chains go on meanwhile.
                    await asyncio.sleep(pause_s)
                    pause_s = min(2 * pause_s, MAX_BUSY_PAUSE_S)
                else:
                    pause_s = BUSY_PAUSE_S
        finally:
            # Stopped (cancelled) with records still queued: their callers hear of it.
            self._fail(queue, AccessLogNotWritten("the access log writer was stopped"))
            del self._queues[chain], self._tasks[chain]

    async def _write(self, batch: _Queued) -> bool:
        """Write ``batch``; True when its chain was held by another transaction
        (nothing written, the callers still waiting)."""
        try:
            async with self._engine.begin() as conn:
                # Per chain (PostgreSQL): try its lock, do not wait for it.
                await append_records(
                    conn, [record for record, _ in batch], wait=not self._per_chain
                )
        except ChainBusy:
            return True
        except asyncio.CancelledError:
            self._fail(batch, AccessLogNotWritten("the access log writer was stopped"))
            raise
        except Exception as err:  # every caller hears of it, whatever it was
            failure = AccessLogNotWritten(
                f"{len(batch)} access records could not be written: {first_line(err)}"
            )
            failure.__cause__ = err
            self._fail(batch, failure)
            return False
        self.batches += 1
        self.records += len(batch)
        for _, future in batch:
            if not future.done():
                future.set_result(None)
        return False

    @staticmethod
    def _fail(batch: _Queued, failure: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(failure)
