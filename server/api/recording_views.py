"""A therapist's own recordings: the list, the download (decrypted as it streams), deletion.

Only the therapist whose consult was recorded may list, download or delete a
recording. Another therapist of the organisation gets 403; a recording of
another organisation answers 404, like one that does not exist, so that
nobody learns what exists elsewhere. Support staff and admins get 403 from
the role check. Every read and every refusal is written to the access log
(actions ``recording.list``, ``recording.download``, ``recording.delete``).

A download is decrypted chunk by chunk in a worker thread and written as it
comes (chunked transfer, so no length is promised up front): memory does not
grow with the file. The access record is written before the first byte
leaves. A file that fails authentication (or ends early although the
recording was finished) after bytes went out cannot be answered with an
error any more: the connection is closed without the transfer's end, so the
client sees a failed download, never a short file that looks whole; and
``recording.download.failed`` is logged. A recording marked incomplete (the
writer stopped before its end) is sent up to its last whole chunk, with
``X-Recording-Status: incomplete``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Generator
from typing import Final

import structlog
from aiohttp import web

from audit.access_log import Outcome
from audit.db import reading
from audit.errors import NotFound
from audit.filestore import StoreError, Truncated
from audit.media_types import MATROSKA, MediaFormat, media_format
from audit.recordings import (
    RecordingEntry,
    RecordingStatus,
    data_key_of,
    get_recording,
    list_recordings,
    plaintext,
    shred,
)
from audit.roles import Role
from audit.sealing import SealError
from server.api.access_records import record_in, record_read
from server.api.errors import ApiError, ConflictError, Forbidden, NotFoundError, Unprocessable
from server.api.query import query_number, query_params, query_uuid
from server.api.representations import recording_json
from server.app_keys import CHUNK_MAPS, CLOCK, DB_ENGINE, FILE_STORE, MASTER_KEY
from server.auth.sessions import Principal, require_role

routes = web.RouteTableDef()

_log = structlog.get_logger("videoconsult.recordings")

RECORDING_PATH = "/api/recordings/{recording_id}"
STATUS_HEADER = "X-Recording-Status"

ACTION_LIST = "recording.list"
ACTION_DOWNLOAD = "recording.download"
ACTION_DOWNLOAD_FAILED = "recording.download.failed"
ACTION_DELETE = "recording.delete"

# The recordings list, a page at a time: a clinic that records all day
# keeps hundreds for as long as its retention says.
RECORDINGS_PAGE: Final = 50
MAX_RECORDINGS_PAGE: Final = 100

# What next() answers once the file's final chunk is through.
_END: Final = object()


class RecordingUnreadable(ApiError):
    status, code = 500, "recording_unreadable"


def download_name(entry: RecordingEntry, kind: MediaFormat = MATROSKA) -> str:
    """A file name of ASCII letters, digits and dashes only: the start time and the id."""
    return f"recording-{entry.created_at:%Y%m%d-%H%M}-{entry.id}{kind.suffix}"


async def log_access(
    request: web.Request,
    principal: Principal,
    action: str,
    recording_id: uuid.UUID | None,
    outcome: Outcome = Outcome.ALLOWED,
) -> None:
    """Record a read of the recording, or a refusal (nothing changed), through
    the access-log writer; return once it is committed."""
    await record_read(
        request,
        principal,
        action=action,
        object_type="recording",
        object_id=recording_id,
        outcome=outcome,
    )


async def own_recording(request: web.Request, principal: Principal, action: str) -> RecordingEntry:
    """The principal's own recording, finished; every refusal is logged as ``action``.

    404 for an unknown id and for another organisation's recording, 403 for
    another therapist's, 409 while it is still being recorded.
    """
    try:
        recording_id: uuid.UUID | None = uuid.UUID(request.match_info["recording_id"])
    except ValueError:
        recording_id = None
    entry: RecordingEntry | None = None
    if recording_id is not None:
        try:
            async with reading(request.app[DB_ENGINE]) as conn:
                entry = await get_recording(conn, recording_id)
        except NotFound:
            entry = None
    problem: ApiError | None = None
    if entry is None or entry.organisation_id != principal.account.organisation_id:
        problem = NotFoundError("no such recording")
    elif entry.therapist_id != principal.account.id:
        problem = Forbidden("only the therapist whose consult was recorded may do this")
    elif entry.status is RecordingStatus.RECORDING:
        problem = ConflictError("this recording is still running; stop it first")
    if problem is not None:
        await log_access(request, principal, action, recording_id, Outcome.REFUSED)
        raise problem
    assert entry is not None
    return entry


@routes.get("/api/recordings")
async def recordings_list(request: web.Request) -> web.Response:
    """The recordings of the therapist's own consults, newest first, a page
    at a time: ``before`` (the last page's ``next_before``) asks for those
    after that recording, ``limit`` for how many."""
    principal = await require_role(request, Role.THERAPIST, action=ACTION_LIST)
    params = query_params(request, frozenset({"before", "limit"}))
    limit = query_number(params, "limit", default=RECORDINGS_PAGE, low=1, high=MAX_RECORDINGS_PAGE)
    before = query_uuid(params, "before", what="a recording's id, the last page's next_before")
    found: list[RecordingEntry] | None
    async with reading(request.app[DB_ENGINE]) as conn:
        try:
            found = await list_recordings(
                conn, principal.account.id, limit=limit + 1, older_than=before
            )
        except NotFound:
            found = None
    if found is None:
        # Logged as a download of another's recording is: the attempt names it.
        await log_access(request, principal, ACTION_LIST, before, Outcome.REFUSED)
        raise Unprocessable(
            "parameter 'before' must be the id of one of your recordings, and that one "
            "is not (or was deleted meanwhile): load the list again from the start"
        )
    await record_read(
        request,
        principal,
        action=ACTION_LIST,
        object_type="therapist",
        object_id=principal.account.id,
    )
    page, more = found[:limit], len(found) > limit
    return web.json_response(
        {
            "recordings": [recording_json(entry) for entry in page],
            "next_before": str(page[-1].id) if more else None,
        }
    )


# No HEAD: it would decrypt the whole file to send nothing, and log a download.
@routes.get(RECORDING_PATH + "/download", allow_head=False)
async def recording_download(request: web.Request) -> web.StreamResponse:
    """The decrypted recording (WebM or Matroska, as its first bytes say),
    streamed as it is decrypted."""
    principal = await require_role(request, Role.THERAPIST, action=ACTION_DOWNLOAD)
    entry = await own_recording(request, principal, ACTION_DOWNLOAD)
    app = request.app
    file_name, data_key = await recording_key(request, principal, entry, ACTION_DOWNLOAD_FAILED)
    await log_access(request, principal, ACTION_DOWNLOAD, entry.id)

    response = web.StreamResponse(headers={STATUS_HEADER: entry.status.value})
    _describe(response, entry, MATROSKA)
    chunks = ChunksInThread(plaintext(app[FILE_STORE], file_name, data_key, entry.id))
    problem: Exception | None = None
    try:
        while True:
            try:
                piece = await chunks.next()
            except Truncated as err:
                # Expected for an incomplete recording: it ends at its last whole chunk.
                if entry.status is not RecordingStatus.INCOMPLETE:
                    problem = err
                break
            except (StoreError, OSError) as err:
                problem = err
                break
            if piece is None:
                break
            if not response.prepared:
                # The first chunk holds the container's header: it names the type.
                _describe(response, entry, media_format(piece))
                await response.prepare(request)
            await response.write(piece)
    except ConnectionError:
        _log.info("a recording download was ended by the client", recording_id=str(entry.id))
        return response
    finally:
        chunks.close()

    if problem is None:
        if not response.prepared:
            await response.prepare(request)  # an empty recording, or an incomplete one
        # aiohttp writes the end of the transfer (and copes with a client gone by then).
        return response
    _log.error(
        "a recording's file is damaged or missing; download stopped",
        recording_id=str(entry.id),
        error=str(problem),
        after_first_byte=response.prepared,
    )
    await log_access(request, principal, ACTION_DOWNLOAD_FAILED, entry.id)
    if not response.prepared:
        raise RecordingUnreadable(
            "this recording's file is damaged or missing and cannot be decrypted; nothing was sent"
        )
    abort_transfer(request, response)
    return response


async def recording_key(
    request: web.Request, principal: Principal, entry: RecordingEntry, failed_action: str
) -> tuple[str, bytes]:
    """The recording's file name and data key; a key that does not open is
    logged as ``failed_action`` (a read attempted and failed is in the access
    log too) and answered 500 ``recording_unreadable``."""
    app = request.app
    try:
        async with reading(app[DB_ENGINE]) as conn:
            return await data_key_of(conn, app[MASTER_KEY].key, entry.id)
    except SealError as err:
        _log.error(
            "a recording's data key does not open", recording_id=str(entry.id), error=str(err)
        )
        await log_access(request, principal, failed_action, entry.id)
        raise RecordingUnreadable("this recording's key does not open on this server") from None


def _describe(response: web.StreamResponse, entry: RecordingEntry, kind: MediaFormat) -> None:
    response.headers["Content-Type"] = kind.media_type
    response.headers["Content-Disposition"] = f'attachment; filename="{download_name(entry, kind)}"'


class ChunksInThread:
    """A blocking generator of chunks, read one chunk at a time in a worker thread.

    Closed only when no read is in flight: a download cancelled mid-read
    leaves its thread running, and the generator (with its open file) is
    closed when that read is done.
    """

    def __init__(self, chunks: Generator[bytes, None, None]) -> None:
        self._chunks = chunks
        self._pending: asyncio.Future[object] | None = None

    async def next(self) -> bytes | None:
        """The next chunk, or None after the final one; raises what decryption raises."""
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(None, next, self._chunks, _END)
        # Shielded: cancelling the download must not pretend the thread stopped.
        piece = await asyncio.shield(self._pending)
        if piece is _END:
            return None
        assert isinstance(piece, bytes)
        return piece

    def close(self) -> None:
        pending = self._pending
        if pending is None or pending.done():
            self._chunks.close()
        else:
            pending.add_done_callback(self._close_after)

    def _close_after(self, read: asyncio.Future[object]) -> None:
        if not read.cancelled():
            read.exception()  # the download is gone; what the read found does not matter
        self._chunks.close()


def abort_transfer(request: web.Request, response: web.StreamResponse) -> None:
    """End the connection without the chunked transfer's last chunk: the client
    sees an incomplete payload, not a short file that looks whole."""
    response.force_close()
    transport = request.transport
    if transport is not None:
        transport.close()


@routes.delete(RECORDING_PATH)
async def recording_delete(request: web.Request) -> web.Response:
    """Destroy the recording: its key first (crypto-shredding), then its file."""
    principal = await require_role(request, Role.THERAPIST, action=ACTION_DELETE)
    entry = await own_recording(request, principal, ACTION_DELETE)
    app = request.app
    async with app[DB_ENGINE].begin() as conn:
        file_names = await shred(conn, [entry.id], now=app[CLOCK].now())
        await record_in(
            conn,
            request,
            principal,
            action=ACTION_DELETE,
            object_type="recording",
            object_id=entry.id,
        )
    # The key is gone (committed): the file can never be decrypted again,
    # whether or not it can be removed right now.
    app[CHUNK_MAPS].discard(file_names)
    try:
        # In a thread: unlinking an hour's file (gigabytes) can take a while.
        await asyncio.to_thread(app[FILE_STORE].delete_files, file_names)
    except OSError as err:
        _log.warning(
            "the file of a deleted recording could not be removed; its key is destroyed",
            recording_id=str(entry.id),
            error=err.strerror,
        )
    return web.Response(status=204)
