"""``videoconsult recording``: recordings for the operator (list, export, delete).

Every command is recorded in the access log of the recording's organisation
with the actor "operator" and client type "cli" (``recording.list``,
``recording.export``, ``recording.export.failed``, ``recording.delete``).

An export writes either everything the recording holds or nothing: the file
``OUT`` is created new (never overwritten) with mode 0600, and removed again
when the encrypted file turns out damaged (a chunk fails authentication, or
a finished recording ends early); the command then exits 1. A recording
marked incomplete (its writer stopped before the end) is exported up to its
last whole chunk, which is all it holds: that is reported on stderr, and the
command succeeds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from audit import prepare_data_dir
from audit.access_log import Actor, record_access
from audit.clock import SystemClock
from audit.db import reading
from audit.filestore import StoreError, Truncated
from audit.recordings import (
    FileStore,
    RecordingEntry,
    RecordingStatus,
    data_key_of,
    get_recording,
    organisation_recordings,
    plaintext,
    shred,
)
from config import Settings
from server.cli.base import (
    CliError,
    current_database,
    operator_read,
    record_operator_access,
    root_key,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "recording",
        help="list, export or delete recordings",
        description="Recordings in the encrypted file store, for the operator.",
    )
    commands = parser.add_subparsers(
        title="recording commands", metavar="RECORDING_COMMAND", required=True
    )
    listing = commands.add_parser(
        "list",
        help="list an organisation's recordings",
        description="List an organisation's recordings (ids, times, status, size; no content).",
    )
    listing.add_argument("--org", required=True, help="the organisation's name")
    listing.set_defaults(run=run_list)

    export = commands.add_parser(
        "export",
        help="decrypt a recording into a new file",
        description=(
            "Decrypt a recording (WebM or Matroska video) into OUT, created new with mode 0600; an "
            "existing OUT is never overwritten. A damaged recording exports nothing (exit 1); "
            "an incomplete one exports up to its last whole chunk and says so on stderr."
        ),
    )
    export.add_argument("recording_id", metavar="RECORDING_ID")
    export.add_argument("out", metavar="OUT", type=Path, help="the file to create")
    export.set_defaults(run=run_export)

    delete = commands.add_parser(
        "delete",
        help="destroy a recording: its key, then its file",
        description=(
            "Destroy a recording: its wrapped key is deleted first (crypto-shredding), "
            "then the file, once that has committed."
        ),
    )
    delete.add_argument("recording_id", metavar="RECORDING_ID")
    delete.set_defaults(run=run_delete)


def _recording_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise CliError(
            f"{raw!r} is not a recording id (a UUID, as `recording list` shows)"
        ) from None


def _store(settings: Settings) -> FileStore:
    return FileStore.in_data_dir(prepare_data_dir(settings.data_dir))


def _finished(entry: RecordingEntry) -> RecordingEntry:
    if entry.status is RecordingStatus.RECORDING:
        raise CliError(f"recording {entry.id} is still running; stop it first")
    return entry


def run_list(settings: Settings, args: argparse.Namespace) -> int:
    async def _list() -> list[RecordingEntry]:
        async with current_database(settings) as engine:
            _, found = await operator_read(
                engine,
                args.org,
                lambda conn, organisation: organisation_recordings(conn, organisation.id),
                action="recording.list",
            )
            return found

    found = asyncio.run(_list())
    for entry in found:
        size = "?" if entry.plaintext_bytes is None else str(entry.plaintext_bytes)
        print(
            f"{entry.id}  consult {entry.consult_id}  {entry.created_at:%Y-%m-%d %H:%M} UTC  "
            f"{entry.status.value:<10}  {size} bytes  key {entry.key_id}"
        )
    if not found:
        print("no recordings")
    return 0


@dataclass(frozen=True)
class Export:
    entry: RecordingEntry
    plaintext_bytes: int
    # Set when the recording is incomplete: what the cut says.
    truncated: str | None


def _create_private(out: Path) -> int:
    try:
        # O_EXCL: never overwrite; 0600: decrypted media is for the operator alone.
        return os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CliError(f"{out} exists; export never overwrites a file, name a new one") from None
    except OSError as err:
        raise CliError(f"cannot create {out}: {err.strerror}") from None


def _discard(out: Path) -> None:
    """Remove a partial export: decrypted media that is not all of it is not kept."""
    out.unlink(missing_ok=True)


def _decrypt_into(
    descriptor: int, store: FileStore, file_name: str, data_key: bytes, entry: RecordingEntry
) -> tuple[int, str | None]:
    """Write the plaintext into the new file ``descriptor``; return its size and,
    for an incomplete recording, what the cut says. Raises StoreError."""
    written = 0
    with os.fdopen(descriptor, "wb") as sink:
        try:
            for piece in plaintext(store, file_name, data_key, entry.id):
                sink.write(piece)
                written += len(piece)
        except Truncated as err:
            if entry.status is not RecordingStatus.INCOMPLETE:
                raise
            return written, str(err)
    return written, None


def run_export(settings: Settings, args: argparse.Namespace) -> int:
    recording_id = _recording_id(args.recording_id)
    out: Path = args.out
    master_key = root_key(settings)
    store = _store(settings)

    async def _export() -> Export:
        async with current_database(settings) as engine:
            async with reading(engine) as conn:
                entry = _finished(await get_recording(conn, recording_id))
                file_name, data_key = await data_key_of(conn, master_key, recording_id)
            descriptor = _create_private(out)
            try:
                await _note(engine, entry, "recording.export")
                written, truncated = await asyncio.to_thread(
                    _decrypt_into, descriptor, store, file_name, data_key, entry
                )
            except (StoreError, OSError) as err:
                _discard(out)
                await _note(engine, entry, "recording.export.failed")
                detail = err.strerror if isinstance(err, OSError) else str(err)
                raise CliError(
                    f"recording {recording_id} cannot be decrypted ({detail}); "
                    f"nothing was exported and {out} is removed"
                ) from None
            except BaseException:
                _discard(out)
                raise
            return Export(entry, written, truncated)

    done = asyncio.run(_export())
    if done.truncated is not None:
        print(
            f"videoconsult: note: recording {recording_id} is incomplete (its writer stopped "
            f"before the end): exported up to its last whole chunk ({done.truncated})",
            file=sys.stderr,
        )
    print(f"recording {recording_id} exported to {out} ({done.plaintext_bytes} bytes)")
    return 0


async def _note(engine: AsyncEngine, entry: RecordingEntry, action: str) -> None:
    await record_operator_access(
        engine,
        organisation_id=entry.organisation_id,
        action=action,
        object_type="recording",
        object_id=entry.id,
    )


def run_delete(settings: Settings, args: argparse.Namespace) -> int:
    recording_id = _recording_id(args.recording_id)

    async def _delete() -> list[str]:
        async with current_database(settings) as engine, engine.begin() as conn:
            entry = _finished(await get_recording(conn, recording_id))
            names = await shred(conn, [recording_id], now=SystemClock().now())
            await record_access(
                conn,
                Actor.operator(),
                organisation_id=entry.organisation_id,
                action="recording.delete",
                object_type="recording",
                object_id=recording_id,
                now=SystemClock().now(),
            )
            return names

    names = asyncio.run(_delete())
    # The key is gone (committed); now the file.
    _store(settings).delete_files(names)
    print(f"recording {recording_id} deleted: its key is destroyed and its file removed")
    return 0
