"""Recordings in the encrypted file store: keys, files, crypto-shredding.

A recording's file (``<data dir>/recordings/<id>.vcenc``) holds only
ciphertext in the format of :mod:`audit.filestore`. Its data key is wrapped by
the current key of the master key ring (:mod:`audit.keyring`; ``seal`` with
purpose ``recording-key``, bound to the recording's id) and kept in the
``recordings`` row, with the id of the key that wrapped it. Deleting the row
destroys the key: the file can never be decrypted again, and it is removed
right after (:meth:`FileStore.delete_files`).

The row also keeps the consent the recording was made under (when the
therapist asked, when the patient or guardian agreed, and which of the two)
and why it stopped; :func:`get_recording` and :func:`list_recordings` read
that back with the consult's therapist and organisation, for whoever decides
who may see it.
"""

from __future__ import annotations

import enum
import os
import uuid
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.db import after_cursor
from audit.errors import NotFound
from audit.filestore import EncryptingWriter, decrypt_chunks, new_data_key
from audit.keyring import KeyRing, WrappingKey, key_id_of, load_ring
from audit.outbox import recording_events
from audit.schema import accounts, consults, destroyed_recordings, recordings
from audit.webhooks import EventType

FILE_SUFFIX = ".vcenc"
# A file's seekable copy while it is made (signaling/remux.py); one left by a
# worker killed meanwhile is encrypted under the recording's key (its first
# chunk zeros, so it never opens as a whole file) and removed with the file.
COPY_SUFFIX = ".seekable"


class RecordingStatus(enum.Enum):
    RECORDING = "recording"
    COMPLETE = "complete"
    # The writer stopped before the end (the server died): readable up to
    # the last full chunk, and reported as truncated.
    INCOMPLETE = "incomplete"


class ConsentBy(enum.Enum):
    PATIENT = "patient"
    # For a patient under 16 (the invite says so): a parent or guardian.
    GUARDIAN = "guardian"


class StopReason(enum.Enum):
    STOPPED_BY_THERAPIST = "stopped_by_therapist"
    STOPPED_BY_PATIENT = "stopped_by_patient"
    # A participant's connection went away (a reconnect never restarts it).
    PARTICIPANT_LEFT = "participant_left"
    CONSULT_ENDED = "consult_ended"
    # The file store's disk is full: the recording stops, the consult goes on.
    STORAGE_FULL = "storage_full"
    # The recorder could not receive or encode media.
    RECORDER_FAILED = "recorder_failed"
    # The server stopped (or died) while recording.
    SERVER_RESTART = "server_restart"
    # The request could not be carried out: the node records as many as it may.
    SERVER_BUSY = "server_busy"


@dataclass(frozen=True)
class Consent:
    requested_at: datetime
    consented_at: datetime
    by: ConsentBy


def master_key_id(master_key: bytes) -> str:
    """A short, public id of a master key (which key wrapped a data key)."""
    return key_id_of(master_key)


@dataclass(frozen=True)
class Recording:
    id: uuid.UUID
    consult_id: uuid.UUID
    created_at: datetime
    status: RecordingStatus
    key_id: str
    file_name: str


class FileStore:
    """The directory of encrypted files (created private)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> FileStore:
        """The recordings' store: the one place that says where in the data directory it is."""
        return cls(data_dir / "recordings")

    def path(self, file_name: str) -> Path:
        return self.root / file_name

    def create(self, file_name: str) -> BinaryIO:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL: never write into a file that exists; 0600: the owner only.
        fd = os.open(self.path(file_name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return os.fdopen(fd, "wb")

    def open(self, file_name: str) -> BinaryIO:
        return open(self.path(file_name), "rb")

    def delete_files(self, file_names: Iterable[str]) -> int:
        """Remove files whose keys are already destroyed; return how many were there.

        Every file is tried: one that cannot be removed (a permission, a
        disk error) stops no other. Then an :class:`OSError` says how many
        are left (their names are recordings' ids, not shown).
        """
        removed = 0
        failed: list[OSError] = []
        for name in file_names:
            for path in (self.path(name + COPY_SUFFIX), self.path(name)):
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as err:
                    failed.append(err)
                    continue
                if path.name == name:
                    removed += 1
        if failed:
            raise OSError(
                failed[0].errno,
                f"{len(failed)} recording files could not be removed "
                f"({type(failed[0]).__name__}); their keys are destroyed already",
            )
        return removed


@dataclass(frozen=True)
class RecordingFile:
    """Where a recording's ciphertext goes and the key it is encrypted with.

    Plain data (a path, the file id, the data key), so that whatever writes
    the file needs nothing else: the recorder, and later a recorder in a
    worker process of its own. The file exists already, created empty
    (``O_EXCL``, mode 0600) in the transaction that made the row.
    """

    path: str
    file_id: uuid.UUID
    data_key: bytes = field(repr=False)

    def open_writer(self) -> EncryptingWriter:
        """The encrypting writer over the file; raises OSError, and refuses a
        file that is not empty (never write into another recording)."""
        descriptor = os.open(self.path, os.O_WRONLY)
        if os.fstat(descriptor).st_size != 0:
            os.close(descriptor)
            raise FileExistsError(f"{self.path} is not the new, empty file of a recording")
        return EncryptingWriter(
            os.fdopen(descriptor, "wb"), self.data_key, self.file_id, owns_sink=True
        )


async def begin_recording(
    conn: AsyncConnection,
    store: FileStore,
    master_key: bytes | WrappingKey,
    consult_id: uuid.UUID,
    *,
    now: datetime,
    consent: Consent | None = None,
) -> tuple[Recording, RecordingFile]:
    """A new recording: its key wrapped in the database, its file created empty.

    ``master_key`` is the ring's current key (:func:`audit.keyring.load_ring`),
    or the root key itself (then the ring is loaded here). A file store that
    cannot create the file raises OSError (the transaction then makes no row).
    """
    wrapping = (
        master_key
        if isinstance(master_key, WrappingKey)
        else (await load_ring(conn, master_key)).current
    )
    recording_id = uuid.uuid4()
    data_key = new_data_key()
    file_name = f"{recording_id}{FILE_SUFFIX}"
    recording = Recording(
        recording_id,
        consult_id,
        now,
        RecordingStatus.RECORDING,
        wrapping.id,
        file_name,
    )
    await conn.execute(
        recordings.insert().values(
            id=recording_id,
            consult_id=consult_id,
            created_at=now,
            status=RecordingStatus.RECORDING.value,
            key_id=wrapping.id,
            wrapped_key=wrapping.wrap(data_key, recording_id=str(recording_id)),
            file_name=file_name,
            requested_at=consent.requested_at if consent else None,
            consented_at=consent.consented_at if consent else None,
            consent_by=consent.by.value if consent else None,
        )
    )
    store.create(file_name).close()
    return recording, RecordingFile(str(store.path(file_name)), recording_id, data_key)


async def start_recording(
    conn: AsyncConnection,
    store: FileStore,
    master_key: bytes | WrappingKey,
    consult_id: uuid.UUID,
    *,
    now: datetime,
    consent: Consent | None = None,
) -> tuple[Recording, EncryptingWriter]:
    """:func:`begin_recording`, with the file open for ciphertext."""
    recording, file = await begin_recording(
        conn, store, master_key, consult_id, now=now, consent=consent
    )
    return recording, file.open_writer()


async def finish_recording(
    conn: AsyncConnection,
    recording_id: uuid.UUID,
    writer: EncryptingWriter | None,
    *,
    now: datetime,
    reason: StopReason | None = None,
    complete: bool = True,
    plaintext_bytes: int | None = None,
) -> None:
    """Close the file (its final chunk) and mark the recording done.

    ``complete=False`` when the file could not be closed properly (the disk
    filled up, the writer failed): it is then marked incomplete, readable up
    to its last full chunk. Either way ``recording.available`` goes to the
    webhooks' outbox, in the caller's transaction.
    """
    if writer is not None and complete:
        writer.close()
    written = writer.plaintext_bytes if writer is not None else plaintext_bytes
    await conn.execute(
        recordings.update()
        .where(recordings.c.id == recording_id)
        .values(
            status=(RecordingStatus.COMPLETE if complete else RecordingStatus.INCOMPLETE).value,
            ended_at=now,
            plaintext_bytes=written,
            stop_reason=reason.value if reason else None,
        )
    )
    await recording_events(conn, [recording_id], EventType.RECORDING_AVAILABLE, now=now)


async def mark_interrupted(
    conn: AsyncConnection, *, now: datetime, consult_id: uuid.UUID | None = None
) -> list[uuid.UUID]:
    """Mark every recording still "recording" (of ``consult_id``, if given) as
    incomplete: the server that wrote it stopped without finishing it; return
    their ids.

    Without ``consult_id``, run at start-up before any new recording begins,
    and on one node only: with several nodes it would also catch another
    node's live recordings. With it, when the node recording that consult died.
    """
    query = sa.select(recordings.c.id).where(recordings.c.status == RecordingStatus.RECORDING.value)
    if consult_id is not None:
        query = query.where(recordings.c.consult_id == consult_id)
    ids = list((await conn.execute(query)).scalars())
    if ids:
        await conn.execute(
            recordings.update()
            .where(recordings.c.id.in_(ids))
            .values(
                status=RecordingStatus.INCOMPLETE.value,
                ended_at=now,
                stop_reason=StopReason.SERVER_RESTART.value,
            )
        )
        # Readable up to the last full chunk: available, as incomplete.
        await recording_events(conn, ids, EventType.RECORDING_AVAILABLE, now=now)
    return ids


async def data_key_of(
    conn: AsyncConnection, master_key: bytes | KeyRing, recording_id: uuid.UUID
) -> tuple[str, bytes]:
    """The recording's file name and unwrapped data key (NotFound once shredded).

    ``master_key`` is the configured root key (the ring is loaded) or the ring.
    """
    row = (
        await conn.execute(
            sa.select(recordings.c.file_name, recordings.c.key_id, recordings.c.wrapped_key).where(
                recordings.c.id == recording_id
            )
        )
    ).first()
    if row is None:
        raise NotFound("no such recording (or it was deleted)")
    ring = master_key if isinstance(master_key, KeyRing) else await load_ring(conn, master_key)
    key = ring.get(row.key_id).unwrap(row.wrapped_key, recording_id=str(recording_id))
    return row.file_name, key


def plaintext(
    store: FileStore, file_name: str, data_key: bytes, recording_id: uuid.UUID
) -> Generator[bytes, None, None]:
    """The decrypted recording, chunk by chunk (see :func:`audit.filestore.decrypt_chunks`);
    ``close()`` it when stopping early, which closes the file."""
    with store.open(file_name) as source:
        yield from decrypt_chunks(source, data_key, file_id=recording_id)


async def shred(
    conn: AsyncConnection, recording_ids: Iterable[uuid.UUID], *, now: datetime
) -> list[str]:
    """Destroy the recordings' keys (delete their rows); return their file names,
    to be removed with :meth:`FileStore.delete_files` once this commits.

    Each leaves its id and consult in ``destroyed_recordings`` (for the
    patient's receipt, :mod:`audit.receipts`), which goes with the consult;
    ``recording.deleted`` goes to the webhooks' outbox, in the caller's
    transaction.
    """
    ids = list(recording_ids)
    if not ids:
        return []
    await recording_events(conn, ids, EventType.RECORDING_DELETED, now=now)
    names = list(
        (
            await conn.execute(sa.select(recordings.c.file_name).where(recordings.c.id.in_(ids)))
        ).scalars()
    )
    await conn.execute(
        destroyed_recordings.insert().from_select(
            ["recording_id", "consult_id"],
            sa.select(recordings.c.id, recordings.c.consult_id).where(recordings.c.id.in_(ids)),
        )
    )
    await conn.execute(recordings.delete().where(recordings.c.id.in_(ids)))
    return names


async def expired_recordings(
    conn: AsyncConnection, organisation_id: uuid.UUID | None, *, cutoff: datetime
) -> list[uuid.UUID]:
    """Recordings of the organisation's consults that ended before ``cutoff``."""
    closed = sa.func.coalesce(consults.c.ended_at, consults.c.created_at)
    if organisation_id is None:
        owner = consults.c.therapist_id.is_(None)
    else:
        owner = consults.c.therapist_id.in_(
            sa.select(accounts.c.id).where(accounts.c.organisation_id == organisation_id)
        )
    query = (
        sa.select(recordings.c.id)
        .join(consults, consults.c.id == recordings.c.consult_id)
        .where(owner, consults.c.ended_at.is_not(None), closed < cutoff)
    )
    return list((await conn.execute(query)).scalars())


def recording_cutoff(now: datetime, days: int) -> datetime:
    return now - timedelta(days=days)


@dataclass(frozen=True)
class RecordingEntry:
    """What is known of a recording besides its key: for its list and its owner."""

    id: uuid.UUID
    consult_id: uuid.UUID
    # None once the therapist's account was erased (the consult stays, unlinked).
    therapist_id: uuid.UUID | None
    organisation_id: uuid.UUID | None
    created_at: datetime
    ended_at: datetime | None
    status: RecordingStatus
    consent: Consent | None
    stop_reason: StopReason | None
    # The plaintext written, as the writer counted it (None while recording).
    plaintext_bytes: int | None
    key_id: str

    @property
    def duration_s(self) -> float | None:
        if self.ended_at is None:
            return None
        return (self.ended_at - self.created_at).total_seconds()


def _entries() -> sa.Select[tuple[object, ...]]:
    return (
        sa.select(
            recordings.c.id,
            recordings.c.consult_id,
            consults.c.therapist_id,
            accounts.c.organisation_id,
            recordings.c.created_at,
            recordings.c.ended_at,
            recordings.c.status,
            recordings.c.requested_at,
            recordings.c.consented_at,
            recordings.c.consent_by,
            recordings.c.stop_reason,
            recordings.c.plaintext_bytes,
            recordings.c.key_id,
        )
        .join(consults, consults.c.id == recordings.c.consult_id)
        .outerjoin(accounts, accounts.c.id == consults.c.therapist_id)
        .order_by(recordings.c.created_at.desc(), recordings.c.id)
    )


def _entry(row: sa.Row[tuple[object, ...]]) -> RecordingEntry:
    m = row._mapping
    consent = (
        Consent(m["requested_at"], m["consented_at"], ConsentBy(m["consent_by"]))
        if m["requested_at"] is not None
        and m["consented_at"] is not None
        and m["consent_by"] is not None
        else None
    )
    return RecordingEntry(
        id=m["id"],
        consult_id=m["consult_id"],
        therapist_id=m["therapist_id"],
        organisation_id=m["organisation_id"],
        created_at=m["created_at"],
        ended_at=m["ended_at"],
        status=RecordingStatus(m["status"]),
        consent=consent,
        stop_reason=StopReason(m["stop_reason"]) if m["stop_reason"] else None,
        plaintext_bytes=m["plaintext_bytes"],
        key_id=m["key_id"],
    )


async def get_recording(conn: AsyncConnection, recording_id: uuid.UUID) -> RecordingEntry:
    """One recording (NotFound once shredded); who may see it is the caller's rule."""
    row = (await conn.execute(_entries().where(recordings.c.id == recording_id))).first()
    if row is None:
        raise NotFound("no such recording (or it was deleted)")
    return _entry(row)


async def list_recordings(
    conn: AsyncConnection,
    therapist_id: uuid.UUID,
    *,
    limit: int,
    older_than: uuid.UUID | None = None,
) -> list[RecordingEntry]:
    """The recordings of the therapist's consults, newest first: at most
    ``limit``, and with ``older_than`` (one of them) those that follow it in
    that order. NotFound when ``older_than`` is not one of the therapist's
    recordings (or was deleted)."""
    query = _entries().where(consults.c.therapist_id == therapist_id)
    if older_than is not None:
        cursor = (
            await conn.execute(
                sa.select(recordings.c.created_at)
                .join(consults, consults.c.id == recordings.c.consult_id)
                .where(recordings.c.id == older_than, consults.c.therapist_id == therapist_id)
            )
        ).first()
        if cursor is None:
            raise NotFound("no such recording (or it was deleted)")
        # The order of _entries(): created_at descending, then id.
        query = query.where(
            after_cursor(recordings.c.created_at, recordings.c.id, cursor.created_at, older_than)
        )
    rows = await conn.execute(query.limit(limit))
    return [_entry(row) for row in rows]


async def organisation_recordings(
    conn: AsyncConnection, organisation_id: uuid.UUID
) -> list[RecordingEntry]:
    """The recordings of the organisation's consults, newest first."""
    rows = await conn.execute(_entries().where(accounts.c.organisation_id == organisation_id))
    return [_entry(row) for row in rows]
