"""Playing a recording in the page: byte ranges of the decrypted file.

``GET /api/recordings/{id}/media`` answers what a ``<video>`` element asks
for: the whole recording (200) or a byte range of it (206, ``Range:
bytes=...``), decrypting only the chunks that hold the range, chunk by chunk
in a worker thread (:func:`audit.filestore.decrypt_range`). The chunks'
places come from their heads alone (:func:`audit.filestore.map_chunks`), so
the length is known up front and the player can seek. The same rules as the
download: the therapist's own finished recordings only, refusals logged;
every answered request is a read of personal data and is in the access log
(``recording.play``; a player asks a few times per viewing: at the start,
for the file's end, and at each seek). The chunk maps of the recordings
played last are kept in memory between requests (:mod:`audit.chunk_maps`);
nothing is cached by the browser or a proxy (``Cache-Control: no-store``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Generator, Mapping

import structlog
from aiohttp import web

from audit.access_log import Outcome
from audit.filestore import ChunkMap, StoreError, Truncated, decrypt_range
from audit.media_types import MATROSKA, media_format
from audit.recordings import FileStore, RecordingEntry, RecordingStatus
from audit.roles import Role
from server.api.errors import ApiError
from server.api.recording_views import (
    RECORDING_PATH,
    STATUS_HEADER,
    ChunksInThread,
    RecordingUnreadable,
    abort_transfer,
    download_name,
    log_access,
    own_recording,
    recording_key,
)
from server.app_keys import CHUNK_MAPS, FILE_STORE
from server.auth.sessions import Principal, require_role

routes = web.RouteTableDef()

_log = structlog.get_logger("videoconsult.recordings")

ACTION_PLAY = "recording.play"
ACTION_PLAY_FAILED = "recording.play.failed"
SUFFIX_OF_NOTHING = re.compile(r"bytes=-0+$")


class RangeNotSatisfiable(ApiError):
    status, code = 416, "range_not_satisfiable"

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.size = size

    def headers(self) -> Mapping[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}


@routes.get(RECORDING_PATH + "/media", allow_head=False)
async def recording_media(request: web.Request) -> web.StreamResponse:
    """The decrypted recording, or the byte range the ``Range`` header asks for."""
    principal = await require_role(request, Role.THERAPIST, action=ACTION_PLAY)
    entry = await own_recording(request, principal, ACTION_PLAY)
    file_name, data_key = await recording_key(request, principal, entry, ACTION_PLAY_FAILED)
    store = request.app[FILE_STORE]
    try:
        try:
            chunk_map = await asyncio.to_thread(
                request.app[CHUNK_MAPS].get, store, file_name, entry.id
            )
        except Truncated:
            if entry.status is not RecordingStatus.INCOMPLETE:
                raise
            # Stopped before anything was written: the file is empty, as its
            # download is (not damaged).
            chunk_map = ChunkMap(b"", (), complete=False)
        if not chunk_map.complete and entry.status is not RecordingStatus.INCOMPLETE:
            raise StoreError("the file ends without its final chunk")
        size = chunk_map.plaintext_size
        try:
            wanted = _wanted(request, size)
        except RangeNotSatisfiable:
            # Answered, and it tells the length: a read like any other.
            await log_access(request, principal, ACTION_PLAY, entry.id, Outcome.REFUSED)
            raise
        head = (
            await asyncio.to_thread(_head, store, file_name, data_key, chunk_map) if size else b""
        )
    except (StoreError, OSError) as err:
        await _unreadable(request, entry, principal, err)
        raise RecordingUnreadable(
            "this recording's file is damaged or missing and cannot be decrypted"
        ) from None
    await log_access(request, principal, ACTION_PLAY, entry.id)
    kind = media_format(head) if head else MATROSKA
    response = web.StreamResponse(status=200 if wanted is None else 206)
    response.headers.update(
        {
            "Content-Type": kind.media_type,
            "Content-Disposition": f'inline; filename="{download_name(entry, kind)}"',
            "Accept-Ranges": "bytes",
            "Cache-Control": "no-store",
            STATUS_HEADER: entry.status.value,
        }
    )
    first, last = wanted if wanted is not None else (0, size - 1)
    if wanted is not None:
        response.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    response.content_length = last - first + 1 if size else 0
    await response.prepare(request)
    if not size:
        return response
    pieces = ChunksInThread(_read(store, file_name, data_key, chunk_map, first, last))
    try:
        while (piece := await pieces.next()) is not None:
            await response.write(piece)
    except ConnectionError:
        return response  # the player had enough (it often asks for more than it reads)
    except (StoreError, OSError) as err:
        await _unreadable(request, entry, principal, err)
        abort_transfer(request, response)
        return response
    finally:
        pieces.close()
    return response


def _wanted(request: web.Request, size: int) -> tuple[int, int] | None:
    """The first and last byte the ``Range`` header asks for, or None for all;
    416 for a range outside the file or one that is not a single byte range."""
    if not request.headers.get("Range", "").lstrip().lower().startswith("bytes="):
        return None  # none, or in a unit other than bytes: ignored (RFC 9110, 14.2)
    try:
        asked = request.http_range
    except ValueError:
        raise RangeNotSatisfiable(
            "the Range header must ask for one range of bytes, e.g. 'bytes=0-' or 'bytes=100-199'",
            size=size,
        ) from None
    start, stop = asked.start, asked.stop
    if SUFFIX_OF_NOTHING.match(request.headers["Range"].strip()):
        # The last 0 bytes (aiohttp reads "-0" as the start 0, i.e. everything).
        raise RangeNotSatisfiable("a range of the last 0 bytes holds nothing", size=size)
    if start is None:
        start = 0
    elif start < 0:  # the last -start bytes
        start = max(0, size + start)
    stop = size if stop is None else min(stop, size)
    if start >= stop:
        raise RangeNotSatisfiable(
            f"the recording has {size} bytes; that range is outside it", size=size
        )
    return start, stop - 1


def _head(store: FileStore, file_name: str, key: bytes, chunk_map: ChunkMap) -> bytes:
    """The first bytes, which say whether it is WebM or Matroska."""
    return b"".join(_read(store, file_name, key, chunk_map, 0, 63))


def _read(
    store: FileStore, file_name: str, key: bytes, chunk_map: ChunkMap, first: int, last: int
) -> Generator[bytes, None, None]:
    last = min(last, chunk_map.plaintext_size - 1)
    if last < first:
        return
    with store.open(file_name) as source:
        yield from decrypt_range(source, key, chunk_map, first, last)


async def _unreadable(
    request: web.Request, entry: RecordingEntry, principal: Principal, err: Exception
) -> None:
    _log.error(
        "a recording's file is damaged or missing; playback stopped",
        recording_id=str(entry.id),
        error=str(err),
    )
    await log_access(request, principal, ACTION_PLAY_FAILED, entry.id)
