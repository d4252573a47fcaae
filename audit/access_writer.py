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

On PostgreSQL each chain has a queue of its own, and up to
``max_concurrent`` transactions write at once, each taking the queued records
of every chain that no other is writing (up to ``max_batch``): with many
organisations a transaction still carries many records, not one chain's
one or two. A chain whose lock another transaction holds (the retention
purge keeps each chain it touched locked until it commits) is tried without
waiting and left out of that transaction, its records back at the front of
its queue, and rests a moment (5 ms, doubling to 200 ms) while the others
go on: it stalls the reads of its own organisation only, never another's,
and holds no connection while it rests. On SQLite, whose one writer every
transaction waits for anyway, one queue takes every chain's records, and
one transaction writes at a time.

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
        self._max_concurrent = max_concurrent
        # Per chain ("" for every chain on SQLite): the records waiting, oldest first.
        self._queues: dict[str, _Queued] = {}
        # Chains in a transaction now, and chains resting after they were found
        # held: (when they may be tried again, on the loop's clock; the pause).
        self._writing: set[str] = set()
        self._resting: dict[str, tuple[float, float]] = {}
        self._workers: set[asyncio.Task[None]] = set()
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
        self._kick()
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
        loop = asyncio.get_running_loop()
        while any(self._queues.values()):
            self._kick()
            if self._workers:
                await asyncio.shield(asyncio.gather(*self._workers, return_exceptions=True))
            else:  # only resting chains are left: their rest ends and they are written
                await asyncio.sleep(max(0.0, self._next_rest_end() - loop.time()))

    def _kick(self) -> None:
        """Start a writing task if one may start and a chain is ready for it."""
        if len(self._workers) < self._max_concurrent and self._ready():
            self._workers.add(asyncio.create_task(self._write_queued(), name="access-log-writer"))

    def _ready(self) -> list[str]:
        """Chains with records that no transaction is writing and that do not rest."""
        now = asyncio.get_running_loop().time()
        return [
            chain
            for chain, queue in self._queues.items()
            if queue
            and chain not in self._writing
            and self._resting.get(chain, (now, 0.0))[0] <= now
        ]

    def _next_rest_end(self) -> float:
        return min((until for until, _pause in self._resting.values()), default=0.0)

    async def _write_queued(self) -> None:
        # While one batch commits, the next queues up: the batch size follows
        # the load by itself, with no timer to wait for.
        try:
            await self._write_ready()
        finally:
            # Counted out in the same step as its last look at the queues (no
            # await between): a record queued after that starts a task of its
            # own. (A done callback runs a step later; a record queued in
            # between waited for the next one to come: 42 s in the
            # PostgreSQL drill, tests/test_drills.py.)
            current = asyncio.current_task()
            assert current is not None
            self._workers.discard(current)

    async def _write_ready(self) -> None:
        while ready := self._ready():
            batch: _Queued = []
            taken: list[str] = []
            for chain in ready:
                queue = self._queues[chain]
                count = min(len(queue), self._max_batch - len(batch))
                if count <= 0:
                    break
                batch += queue[:count]
                del queue[:count]
                taken.append(chain)
            self._writing.update(taken)
            try:
                held = await self._write(batch)
            finally:
                self._writing.difference_update(taken)
            for chain in taken:
                queue = self._queues[chain]
                if chain in held:  # back to the front, in order, for the next try
                    queue[0:0] = [item for item in batch if self._chain(item) == chain]
                    self._rest(chain)
                else:
                    self._resting.pop(chain, None)
                    if not queue:
                        del self._queues[chain]

    def _chain(self, item: tuple[AccessRecord, asyncio.Future[None]]) -> str:
        return chain_of(item[0].organisation_id) if self._per_chain else ""

    def _rest(self, chain: str) -> None:
        """The chain was held (the retention purge, till it commits): try it
        again after a pause, doubling, without a connection meanwhile."""
        loop = asyncio.get_running_loop()
        pause = (
            min(2 * self._resting[chain][1], MAX_BUSY_PAUSE_S)
            if chain in self._resting
            else (BUSY_PAUSE_S)
        )
        self._resting[chain] = (loop.time() + pause, pause)
        loop.call_later(pause, self._rested, chain)

    def _rested(self, chain: str) -> None:
        """The chain's pause is over: ready now (a timer may fire a little
        before its time by the loop's clock, which would leave the chain
        resting and nobody to wake it), its pause kept for the next doubling."""
        if chain in self._resting:
            self._resting[chain] = (float("-inf"), self._resting[chain][1])
        self._kick()

    async def _write(self, batch: _Queued) -> set[str]:
        """Write ``batch``; return the chains held by another transaction
        (their records not written, their callers still waiting)."""
        try:
            async with self._engine.begin() as conn:
                # Per chain (PostgreSQL): try the locks, do not wait for them.
                held = await append_records(
                    conn, [record for record, _ in batch], wait=not self._per_chain
                )
        except asyncio.CancelledError:
            self._fail(batch, AccessLogNotWritten("the access log writer was stopped"))
            raise
        except Exception as err:  # every caller hears of it, whatever it was
            chains = sorted({self._chain(item) for item in batch})
            if len(chains) > 1:
                # One chain's fault fails no other organisation's reads: each
                # chain is tried again in a transaction of its own.
                held = set()
                for chain in chains:
                    held |= await self._write(
                        [item for item in batch if self._chain(item) == chain]
                    )
                return held
            failure = AccessLogNotWritten(
                f"{len(batch)} access records could not be written: {first_line(err)}"
            )
            failure.__cause__ = err
            self._fail(batch, failure)
            return set()
        written = [item for item in batch if self._chain(item) not in held]
        if written:
            self.batches += 1
            self.records += len(written)
        for _, future in written:
            if not future.done():
                future.set_result(None)
        return held

    @staticmethod
    def _fail(batch: _Queued, failure: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(failure)
