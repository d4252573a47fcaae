"""Retention and destruction: each organisation's settings, and the purge.

What has passed its organisation's retention is deleted, irreversibly:

- consult records (and their invites, the patient's receipts and the ids
  of their destroyed recordings: the receipt no longer opens), counted
  from when the consult ended (or was closed without starting); a consult
  whose therapist was erased belongs to no organisation any more and
  follows the installation's defaults;
- access records, counted from when they were written: the oldest part
  of each organisation's chain goes, a checkpoint keeps the position and
  hash of the last record purged (so the chain still verifies), and a
  chained ``access_log.purge`` record says what was removed;
- recordings, counted from when their consult ended (and with their
  consult record when that goes first): the wrapped data key is destroyed
  first (the row goes in this transaction), the file only after the commit
  (:attr:`PurgeReport.files`, for :meth:`audit.recordings.FileStore.delete_files`),
  so a file that outlives a crash can no longer be decrypted.

Only one node purges at a time: on PostgreSQL the purge takes a
transaction-level advisory lock and skips when another node holds it; on
SQLite transactions are serial anyway. (With Redis, the server's purge job
also takes a Redis lock first, so that the other nodes skip without
opening a transaction: :func:`server.housekeeping.retention_round`.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.access_log import (
    PURGE_ACTION,
    SYSTEM,
    AccessRecord,
    ClientType,
    Outcome,
    append_access,
    chain_of,
)
from audit.consults import ConsultStatus
from audit.db import save_organisation_row
from audit.outbox import forget_subjects
from audit.pace import Pace
from audit.recordings import expired_recordings, shred
from audit.schema import (
    access_log,
    access_log_checkpoints,
    accounts,
    consults,
    organisations,
    recordings,
    retention_settings,
)
from audit.webhooks import EventType

_log = structlog.get_logger(__name__)

# pg_try_advisory_xact_lock key: one purge at a time across nodes.
PURGE_LOCK_KEY = 0x7663_7075_7267_6500  # "vcpurge"
# Rows deleted per statement (and per progress step).
BATCH = 1000
# Rows (recordings, consult records, access records of all chains) that one
# transaction of :func:`purge_in_steps` deletes at most. On SQLite a
# transaction holds the write lock until its commit, and every append (so
# every read of personal data) waits for it, for 5 s at most (the busy
# timeout): 300,000 access records in one transaction took 5 s here and an
# append failed; a step of 10,000 takes about 0.3 s (bench/purge_steps.py,
# docs/benchmarks.md).
STEP = 10_000
# SQLite, between two steps: a writer waiting for the lock retries every 100 ms
# at most (sqlite3_busy_timeout's sleeps); without a pause longer than that the
# next step takes the lock again first, and the writer waits for the whole purge.
STEP_PAUSE_S = 0.12

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Retention:
    consult_days: int
    recording_days: int
    access_log_days: int


@dataclass
class PurgedOrganisation:
    organisation_id: uuid.UUID | None
    recordings: int = 0
    consults: int = 0
    access_log_records: int = 0
    # The last access record purged (the new checkpoint), if any.
    checkpoint_seq: int | None = None


@dataclass
class PurgeReport:
    dry_run: bool
    # False when another node was purging at the time (nothing was done).
    ran: bool = True
    organisations: list[PurgedOrganisation] = field(default_factory=list)
    # Encrypted files whose keys this purge destroyed: delete them after commit.
    files: list[str] = field(default_factory=list)
    # Of one step (purge with ``at_most``): more may be left for the next. Of
    # purge_in_steps's sum: a step failed and the purge stopped there.
    unfinished: bool = False

    def absorb(self, step: PurgeReport) -> None:
        """Add what one more transaction of the same purge removed."""
        self.files += step.files
        for purged in step.organisations:
            mine = next(
                (o for o in self.organisations if o.organisation_id == purged.organisation_id),
                None,
            )
            if mine is None:
                self.organisations.append(purged)
                continue
            mine.recordings += purged.recordings
            mine.consults += purged.consults
            mine.access_log_records += purged.access_log_records
            if purged.checkpoint_seq is not None:
                mine.checkpoint_seq = purged.checkpoint_seq

    @property
    def recordings(self) -> int:
        return sum(org.recordings for org in self.organisations)

    @property
    def consults(self) -> int:
        return sum(org.consults for org in self.organisations)

    @property
    def access_log_records(self) -> int:
        return sum(org.access_log_records for org in self.organisations)


async def retention_of(
    conn: AsyncConnection, organisation_id: uuid.UUID, *, defaults: Retention
) -> Retention:
    row = (
        await conn.execute(
            sa.select(retention_settings).where(
                retention_settings.c.organisation_id == organisation_id
            )
        )
    ).first()
    if row is None:
        return defaults
    return Retention(row.consult_days, row.recording_days, row.access_log_days)


async def set_retention(
    conn: AsyncConnection, organisation_id: uuid.UUID, retention: Retention, *, now: datetime
) -> None:
    values = {
        "consult_days": retention.consult_days,
        "recording_days": retention.recording_days,
        "access_log_days": retention.access_log_days,
        "updated_at": now,
    }
    await save_organisation_row(conn, retention_settings, organisation_id, values)


def _owned_by(organisation_id: uuid.UUID | None) -> sa.ColumnElement[bool]:
    if organisation_id is None:
        return consults.c.therapist_id.is_(None)
    return consults.c.therapist_id.in_(
        sa.select(accounts.c.id).where(accounts.c.organisation_id == organisation_id)
    )


def _consult_expired(cutoff: datetime) -> sa.ColumnElement[bool]:
    over = consults.c.status.in_([ConsultStatus.ENDED.value, ConsultStatus.NOT_STARTED.value])
    closed = sa.func.coalesce(consults.c.ended_at, consults.c.created_at)
    return sa.and_(over, closed < cutoff)


def _expired_consults(organisation_id: uuid.UUID | None, cutoff: datetime) -> sa.Select[uuid.UUID]:
    return sa.select(consults.c.id).where(_owned_by(organisation_id), _consult_expired(cutoff))


async def _purge_consults(
    conn: AsyncConnection,
    organisation_id: uuid.UUID | None,
    cutoff: datetime,
    *,
    progress: Progress | None,
    files: list[str],
    now: datetime,
    at_most: int | None = None,
) -> tuple[int, int]:
    """Delete the expired consult records (at most ``at_most``) and the
    recordings still left of them; return how many of each."""
    expired = _expired_consults(organisation_id, cutoff)
    if at_most is not None:
        expired = expired.order_by(consults.c.id).limit(at_most)
    ids = list((await conn.execute(expired)).scalars())
    recordings_destroyed = 0
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        # A consult's recordings go before it: keys first, files after commit.
        of_these = list(
            (
                await conn.execute(
                    sa.select(recordings.c.id).where(recordings.c.consult_id.in_(chunk))
                )
            ).scalars()
        )
        recordings_destroyed += len(of_these)
        files += await shred(conn, of_these, now=now)
        await forget_subjects(conn, of_these, (EventType.RECORDING_AVAILABLE,))
        await forget_subjects(conn, chunk, (EventType.CONSULT_STARTED, EventType.CONSULT_ENDED))
        # Invites and receipts go with them (ON DELETE CASCADE).
        await conn.execute(consults.delete().where(consults.c.id.in_(chunk)))
        if progress is not None:
            progress(len(chunk) + len(of_these))
    return len(ids), recordings_destroyed


async def _count_expired(
    conn: AsyncConnection, organisation_id: uuid.UUID | None, retention: Retention, now: datetime
) -> tuple[int, int]:
    """How many consult records and recordings a purge now would destroy
    (counted by the database: a dry run reads no ids). A recording goes when
    its own period is over or when its consult's record goes, whichever is
    first."""
    owned = _owned_by(organisation_id)
    consult_expired = _consult_expired(now - timedelta(days=retention.consult_days))
    recording_cutoff = now - timedelta(days=retention.recording_days)
    recording_expired = sa.and_(
        consults.c.ended_at.is_not(None), consults.c.ended_at < recording_cutoff
    )
    consult_count = await conn.scalar(
        sa.select(sa.func.count()).select_from(consults).where(owned, consult_expired)
    )
    recording_count = await conn.scalar(
        sa.select(sa.func.count())
        .select_from(recordings.join(consults, consults.c.id == recordings.c.consult_id))
        .where(owned, sa.or_(recording_expired, consult_expired))
    )
    return int(consult_count or 0), int(recording_count or 0)


async def _purge_chain(
    conn: AsyncConnection,
    organisation_id: uuid.UUID | None,
    cutoff: datetime,
    *,
    now: datetime,
    dry_run: bool,
    progress: Progress | None,
    at_most: int | None = None,
) -> tuple[int, int | None, bool]:
    """Delete the oldest part of a chain written before ``cutoff``, at most
    ``at_most`` records of it; return how many records, the last purged seq
    and whether expired records are left after it."""
    chain = chain_of(organisation_id)
    lowest = await conn.scalar(
        sa.select(sa.func.min(access_log.c.seq)).where(access_log.c.chain == chain)
    )
    if lowest is None:
        return 0, None, False
    stepping = at_most is not None and not dry_run
    # A chain's seqs have no gaps after its start: a step takes the next at_most.
    window = access_log.c.seq < int(lowest) + (at_most or 0) if stepping else sa.true()
    # The chain is in time order: purge up to the first record still inside
    # its retention (never past it, so what remains is one unbroken piece),
    # looked for in the step's window: a step reads no more than it deletes.
    first_kept = await conn.scalar(
        sa.select(sa.func.min(access_log.c.seq)).where(
            access_log.c.chain == chain, window, access_log.c.at >= cutoff
        )
    )
    bound = sa.and_(window, access_log.c.seq < first_kept) if first_kept is not None else window
    last = (
        await conn.execute(
            sa.select(access_log.c.seq, access_log.c.hash)
            .where(access_log.c.chain == chain, bound)
            .order_by(access_log.c.seq.desc())
            .limit(1)
        )
    ).first()
    if last is None:
        return 0, None, False
    count = int(
        await conn.scalar(sa.select(sa.func.count()).where(access_log.c.chain == chain, bound)) or 0
    )
    if dry_run:
        return count, last.seq, False
    more = False
    if stepping and first_kept is None:
        # The whole window expired: whether the record after it did too.
        after = await conn.scalar(
            sa.select(access_log.c.at)
            .where(access_log.c.chain == chain, access_log.c.seq > last.seq)
            .order_by(access_log.c.seq)
            .limit(1)
        )
        more = after is not None and after < cutoff
    await conn.execute(
        access_log_checkpoints.insert().values(
            chain=chain,
            through_seq=last.seq,
            through_hash=last.hash,
            created_at=now,
            records_purged=count,
        )
    )
    for start in range(int(lowest), last.seq + 1, BATCH):
        deleted = await conn.execute(
            access_log.delete().where(
                access_log.c.chain == chain,
                access_log.c.seq >= start,
                access_log.c.seq < min(start + BATCH, last.seq + 1),
            )
        )
        if progress is not None:
            progress(deleted.rowcount)
    await append_access(
        conn,
        AccessRecord(
            at=now,
            organisation_id=organisation_id,
            actor_id=None,
            actor_role=SYSTEM,
            action=PURGE_ACTION,
            object_type="access_log",
            object_id=f"through {last.seq}",
            outcome=Outcome.ALLOWED,
            client_type=ClientType.CLI,
        ),
    )
    return count, last.seq, more


async def preview_organisation(
    conn: AsyncConnection, organisation_id: uuid.UUID, retention: Retention, *, now: datetime
) -> PurgedOrganisation:
    """What a purge now under ``retention`` would remove of one organisation;
    removes nothing (a dry run, for the admin's preview)."""
    preview = PurgedOrganisation(organisation_id)
    preview.consults, preview.recordings = await _count_expired(
        conn, organisation_id, retention, now
    )
    preview.access_log_records, preview.checkpoint_seq, _ = await _purge_chain(
        conn,
        organisation_id,
        now - timedelta(days=retention.access_log_days),
        now=now,
        dry_run=True,
        progress=None,
    )
    return preview


async def count_expired(conn: AsyncConnection, *, now: datetime, defaults: Retention) -> int:
    """How many rows a purge now would delete (for a progress bar's total)."""
    report = await purge(conn, now=now, defaults=defaults, dry_run=True)
    return report.recordings + report.consults + report.access_log_records


async def purge(
    conn: AsyncConnection,
    *,
    now: datetime,
    defaults: Retention,
    dry_run: bool = False,
    progress: Progress | None = None,
    at_most: int | None = None,
) -> PurgeReport:
    """Delete what has passed its retention, in the caller's transaction: all
    of it, or at most ``at_most`` rows in all (recordings, consult records,
    access records), organisation after organisation (the report is then
    ``unfinished`` if more may be left: :func:`purge_in_steps`)."""
    report = PurgeReport(dry_run=dry_run)
    if conn.dialect.name == "postgresql" and not dry_run:
        got = await conn.scalar(sa.select(sa.func.pg_try_advisory_xact_lock(PURGE_LOCK_KEY)))
        if not got:
            report.ran = False
            return report
    budget = None if dry_run else at_most
    owners: list[uuid.UUID | None] = [
        *(await conn.execute(sa.select(organisations.c.id).order_by(organisations.c.id))).scalars(),
        None,
    ]
    for organisation_id in owners:
        retention = (
            await retention_of(conn, organisation_id, defaults=defaults)
            if organisation_id is not None
            else defaults
        )
        purged = PurgedOrganisation(organisation_id)
        if dry_run:
            purged.consults, purged.recordings = await _count_expired(
                conn, organisation_id, retention, now
            )
        elif budget is not None and budget <= 0:
            # This step's limit is spent: the organisations left wait for the next.
            report.unfinished = True
        else:
            expired = await expired_recordings(
                conn, organisation_id, cutoff=now - timedelta(days=retention.recording_days)
            )
            if budget is not None and len(expired) > budget:
                expired, report.unfinished = expired[:budget], True
            report.files += await shred(conn, expired, now=now)
            # The webhooks' history of them goes too; the news of their
            # destruction (recording.deleted, just written) is still to be sent.
            await forget_subjects(conn, expired, (EventType.RECORDING_AVAILABLE,))
            if progress is not None and expired:
                progress(len(expired))
            if budget is not None:
                budget -= len(expired)
            if budget is None or budget > 0:
                purged.consults, with_consults = await _purge_consults(
                    conn,
                    organisation_id,
                    now - timedelta(days=retention.consult_days),
                    progress=progress,
                    files=report.files,
                    now=now,
                    at_most=budget,
                )
                if budget is not None:
                    report.unfinished = report.unfinished or purged.consults == budget
                    budget -= purged.consults + with_consults
                purged.recordings = len(expired) + with_consults
            else:
                purged.recordings = len(expired)
        if budget is not None and budget <= 0:
            # This step's limit is spent: the chains left wait for the next.
            report.unfinished = True
        else:
            purged.access_log_records, purged.checkpoint_seq, more = await _purge_chain(
                conn,
                organisation_id,
                now - timedelta(days=retention.access_log_days),
                now=now,
                dry_run=dry_run,
                progress=progress,
                at_most=budget,
            )
            report.unfinished = report.unfinished or more
            if budget is not None:
                budget -= purged.access_log_records
        if purged.recordings or purged.consults or purged.access_log_records:
            report.organisations.append(purged)
    return report


async def purge_in_steps(
    engine: AsyncEngine,
    *,
    now: datetime,
    defaults: Retention,
    progress: Progress | None = None,
    after_step: Callable[[PurgeReport], Awaitable[None]] | None = None,
    delete_files: Callable[[list[str]], Awaitable[None]] | None = None,
    share: float = 1.0,
    peers: str | None = None,
) -> PurgeReport:
    """The purge as the server and the command line run it, in transactions
    of their own, each of at most :data:`STEP` rows (expired recordings,
    consult records and access records, in that order), until nothing
    expired is left (the same ``now`` throughout). Each leaves a checkpoint
    and a purge record per chain it reached, so the chains verify between
    any two. ``after_step`` is awaited after each commit; the report is the
    sum of the steps', not ``ran`` only if
    another node held the purge from the start. A step after the first that
    fails ends the purge there (``unfinished``; logged), keeping what the
    steps before did. ``delete_files`` is awaited with each step's files
    right after its commit (their keys are gone): a later step that fails
    or is cancelled (a shutdown) must not leave them on the disk. Between
    steps it rests, so as to be busy at most its part of ``share`` (with
    the machine's paced jobs registered in ``peers``: audit/pace.py), and on
    SQLite at least :data:`STEP_PAUSE_S`."""
    # A share out of range is refused here, before anything is deleted.
    pace = Pace(share, peers=peers)
    total = PurgeReport(dry_run=False)
    first = True

    async def one_step() -> tuple[PurgeReport | None, Exception | None]:
        try:
            async with engine.begin() as conn:
                step = await purge(
                    conn, now=now, defaults=defaults, progress=progress, at_most=STEP
                )
        except Exception as err:
            return None, err
        if delete_files is not None and step.files:
            await delete_files(step.files)
        return step, None

    with pace:  # leaves the machine's paced jobs however the purge ends
        while True:
            pace.rested()
            stepping = asyncio.ensure_future(one_step())
            try:
                step, failed = await asyncio.shield(stepping)
            except asyncio.CancelledError:
                # A shutdown: a COMMIT under way commits all the same, so the step
                # goes on to its end, its files deleted; then the purge stops.
                await asyncio.wait([stepping])
                raise
            if step is None:
                assert failed is not None
                if first:
                    raise failed  # nothing done
                # What the steps before committed stays done (their files are
                # deleted); the next purge goes on from here.
                _log.warning("retention purge stopped after a step", error=type(failed).__name__)
                total.unfinished = True
                return total
            if after_step is not None:
                await after_step(step)
            if not step.ran:
                # Another node purges now (it goes on where this one stopped).
                total.ran = not first
                return total
            first = False
            total.absorb(step)
            if not step.unfinished:
                return total
            rest = pace.due()
            if engine.dialect.name == "sqlite":
                rest = max(rest, STEP_PAUSE_S)
            await asyncio.sleep(rest)
