"""Playing a recording in the page: byte ranges of the decrypted file, for the
owner only, each request in the access log, nothing cached."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import aiohttp
import pytest

from audit.chunk_maps import ChunkMapCache
from audit.consults import mark_ended
from audit.filestore import DEFAULT_CHUNK_SIZE, EncryptingWriter, new_data_key
from audit.recordings import FileStore
from audit.roles import Role
from server.app_keys import CHUNK_MAPS, DB_ENGINE
from server.housekeeping import retention_round
from tests.support.harness import Harness
from tests.support.recording import data_key
from tests.test_recording_download import (
    chunk_offset,
    file_of,
    flip_byte,
    last_record,
    log_records,
    recorded,
)

CHUNK = DEFAULT_CHUNK_SIZE
WEBM_HEADER = (
    b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\xf2\x81\x04"
    b"\x42\xf3\x81\x08\x42\x82\x84webm"
)


def media_of(recording_id: object) -> str:
    return f"/api/recordings/{recording_id}/media"


async def test_the_player_gets_the_whole_file_or_any_range_of_it(harness: Harness) -> None:
    media = WEBM_HEADER + os.urandom(3 * CHUNK + 1234)
    rec = await recorded(harness, media)
    before = len(await log_records(harness))

    whole = await harness.client.get(media_of(rec.id))
    assert whole.status == 200, await whole.text()
    assert whole.content_type == "video/webm"
    assert whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["Content-Length"] == str(len(media))
    assert whole.headers["Cache-Control"] == "no-store"
    assert whole.headers["Content-Disposition"].startswith('inline; filename="recording-')
    assert await whole.read() == media

    size = len(media)
    for asked, first, last in (
        ("bytes=0-", 0, size - 1),
        ("bytes=0-0", 0, 0),
        (f"bytes={CHUNK - 10}-{CHUNK + 10}", CHUNK - 10, CHUNK + 10),  # across two chunks
        (f"bytes={2 * CHUNK + 5}-", 2 * CHUNK + 5, size - 1),  # from the middle of a chunk
        ("bytes=-100", size - 100, size - 1),  # the last 100 bytes
        (f"bytes=100-{10 * size}", 100, size - 1),  # past the end: up to the end
    ):
        part = await harness.client.get(media_of(rec.id), headers={"Range": asked})
        assert part.status == 206, (asked, await part.text())
        assert part.headers["Content-Range"] == f"bytes {first}-{last}/{size}", asked
        assert part.headers["Content-Length"] == str(last - first + 1)
        assert await part.read() == media[first : last + 1], asked

    plays = (await log_records(harness))[before:]
    assert [(r.action, r.object_id, r.outcome) for r in plays] == [
        ("recording.play", str(rec.id), "allowed")
    ] * 7


@pytest.mark.parametrize("asked", ["bytes=99999999-", "bytes=5-2", "bytes=0-1,5-6", "bytes=-0"])
async def test_a_range_outside_the_file_or_of_several_parts_is_416(
    harness: Harness, asked: str
) -> None:
    rec = await recorded(harness, os.urandom(1000))
    response = await harness.client.get(media_of(rec.id), headers={"Range": asked})
    assert response.status == 416, await response.text()
    assert response.headers["Content-Range"] == "bytes */1000"
    assert (await response.json())["error"]["code"] == "range_not_satisfiable"
    # It tells the recording's length: in the access log, as refused.
    refused = await last_record(harness)
    assert (refused.action, refused.object_id, refused.outcome) == (
        "recording.play",
        str(rec.id),
        "refused",
    )


async def test_nobody_but_the_owner_plays_and_the_refusal_is_logged(harness: Harness) -> None:
    media = os.urandom(1000)
    rec = await recorded(harness, media)
    colleague = await harness.professional("colleague@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(colleague)
    response = await harness.client.get(media_of(rec.id), headers={"Range": "bytes=0-"})
    assert response.status == 403
    assert media not in await response.read()
    refusal = await last_record(harness)
    assert (refusal.actor_id, refusal.action, refusal.object_id, refusal.outcome) == (
        colleague.account_id,
        "recording.play",
        str(rec.id),
        "refused",
    )


async def test_a_damaged_chunk_in_the_range_fails_the_transfer(harness: Harness) -> None:
    media = os.urandom(4 * CHUNK)
    rec = await recorded(harness, media)
    flip_byte(file_of(harness, rec.id), chunk_offset(2) + 10)
    # A range that does not need the damaged chunk still plays.
    fine = await harness.client.get(media_of(rec.id), headers={"Range": f"bytes=0-{CHUNK}"})
    assert await fine.read() == media[: CHUNK + 1]
    response = await harness.client.get(media_of(rec.id), headers={"Range": f"bytes={CHUNK}-"})
    assert response.status == 206
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    failed = await last_record(harness)
    assert (failed.action, failed.object_id) == ("recording.play.failed", str(rec.id))


async def test_an_incomplete_recording_plays_up_to_its_last_whole_chunk(harness: Harness) -> None:
    media = os.urandom(3 * CHUNK + 500)
    rec = await recorded(harness, media, complete=False)
    response = await harness.client.get(media_of(rec.id))
    assert response.status == 200
    assert response.headers["X-Recording-Status"] == "incomplete"
    body = await response.read()
    assert body == media[: len(body)]
    assert len(body) >= 3 * CHUNK


async def test_a_recording_stopped_before_anything_was_written_plays_as_empty(
    harness: Harness,
) -> None:
    # Found in review: a recording stopped while its file was made keeps an
    # empty file (and says so: incomplete, 0 bytes). Its download is empty;
    # playing it answered 500 "damaged or missing", logged as a failure.
    rec = await recorded(harness, b"", complete=False)
    file_of(harness, rec.id).write_bytes(b"")
    response = await harness.client.get(media_of(rec.id))
    assert response.status == 200, await response.text()
    assert response.headers["X-Recording-Status"] == "incomplete"
    assert await response.read() == b""
    played = await last_record(harness)
    assert (played.action, played.object_id, played.outcome) == (
        "recording.play",
        str(rec.id),
        "allowed",
    )


async def test_a_range_in_a_unit_other_than_bytes_is_ignored(harness: Harness) -> None:
    # RFC 9110, 14.2: a Range in a unit the server does not know is ignored.
    media = os.urandom(1000)
    rec = await recorded(harness, media)
    response = await harness.client.get(media_of(rec.id), headers={"Range": "items=0-5"})
    assert response.status == 200, await response.text()
    assert await response.read() == media


async def test_a_played_recordings_chunk_map_is_read_once_and_again_when_its_file_changes(
    harness: Harness,
) -> None:
    cache = harness.app[CHUNK_MAPS]
    media = os.urandom(3 * CHUNK + 100)
    rec = await recorded(harness, media)
    for asked in ("bytes=0-", f"bytes={2 * CHUNK}-", "bytes=-50"):
        part = await harness.client.get(media_of(rec.id), headers={"Range": asked})
        assert part.status == 206
        await part.read()
    assert (cache.misses, cache.hits) == (1, 2)
    # The file is put in its place anew (as the remux's seekable copy is), longer:
    # the map of the old one is not used for it.
    path = file_of(harness, rec.id)
    write_encrypted(Path(f"{path}.new"), await data_key(harness, rec.id), rec.id, media + b"more")
    os.replace(f"{path}.new", path)
    whole = await harness.client.get(media_of(rec.id))
    assert await whole.read() == media + b"more"
    assert (cache.misses, cache.hits) == (2, 2)


async def test_a_deleted_recording_leaves_no_chunk_map_behind(harness: Harness) -> None:
    cache = harness.app[CHUNK_MAPS]
    rec = await recorded(harness, os.urandom(1000))
    assert (await harness.client.get(media_of(rec.id))).status == 200
    assert len(cache) == 1
    deleted = await harness.client.delete(f"/api/recordings/{rec.id}", headers=harness.headers)
    assert deleted.status == 204
    assert len(cache) == 0


async def test_a_recording_the_retention_purge_destroys_leaves_no_chunk_map_behind(
    harness: Harness,
) -> None:
    cache = harness.app[CHUNK_MAPS]
    rec = await recorded(harness, os.urandom(1000))
    assert (await harness.client.get(media_of(rec.id))).status == 200
    assert len(cache) == 1
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_ended(conn, uuid.UUID(rec.consult_id), now=harness.clock.now())
    harness.clock.advance(31 * 86400)  # recordings are kept 30 days by default
    report = await retention_round(harness.app)
    assert report is not None
    assert report.recordings == 1
    assert not file_of(harness, rec.id).exists()
    assert len(cache) == 0


def write_encrypted(path: Path, key: bytes, file_id: uuid.UUID, media: bytes) -> None:
    with open(path, "wb") as sink, EncryptingWriter(sink, key, file_id) as writer:
        writer.write(media)


def test_the_chunk_map_cache_holds_at_most_its_chunks_least_recently_used_out_first(
    tmp_path: Path,
) -> None:
    store = FileStore(tmp_path)
    ids = [uuid.uuid4() for _ in range(3)]
    for file_id in ids:
        with (
            store.create(f"{file_id}.vcenc") as sink,
            EncryptingWriter(sink, new_data_key(), file_id) as writer,
        ):
            writer.write(os.urandom(2 * CHUNK))  # three chunks: two full, the final empty
    cache = ChunkMapCache(max_chunks=4)
    first, second, third = ((f"{file_id}.vcenc", file_id) for file_id in ids)
    cache.get(store, *first)
    cache.get(store, *second)
    cache.get(store, *first)  # now the second is the least recently used
    cache.get(store, *third)
    assert len(cache) == 2
    assert (cache.misses, cache.hits) == (3, 1)
    cache.get(store, *first)
    cache.get(store, *third)
    assert (cache.misses, cache.hits) == (3, 3)
    cache.get(store, *second)
    assert cache.misses == 4
