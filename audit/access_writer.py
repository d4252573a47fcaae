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

from audit.access_log import AccessRecord, Actor, Outcome, access_record, append_records
from audit.db import first_line
from audit.errors import AccessLogNotWritten

# Enough to carry 32 concurrent writers' records in one transaction several
# times over; small enough that hashing a batch on the loop takes about a
# millisecond.
MAX_BATCH = 256


class AccessLogWriter:
    """Appends access records in batches; create it with the engine, close it before disposing."""

    def __init__(self, engine: AsyncEngine, *, max_batch: int = MAX_BATCH) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._queue: list[tuple[AccessRecord, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False
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
        self._queue.append((record, future))
        if self._task is None:
            self._task = asyncio.create_task(self._write_queued(), name="access-log-writer")
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
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _write_queued(self) -> None:
        # While one batch commits, the next queues up: the batch size follows
        # the load by itself, with no timer to wait for.
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._write(batch)
        finally:
            self._task = None

    async def _write(self, batch: list[tuple[AccessRecord, asyncio.Future[None]]]) -> None:
        try:
            async with self._engine.begin() as conn:
                await append_records(conn, [record for record, _ in batch])
        except asyncio.CancelledError:
            self._fail(batch, AccessLogNotWritten("the access log writer was stopped"))
            raise
        except Exception as err:  # every caller hears of it, whatever it was
            failure = AccessLogNotWritten(
                f"{len(batch)} access records could not be written: {first_line(err)}"
            )
            failure.__cause__ = err
            self._fail(batch, failure)
            return
        self.batches += 1
        self.records += len(batch)
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    @staticmethod
    def _fail(batch: list[tuple[AccessRecord, asyncio.Future[None]]], failure: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(failure)
