"""A therapist's recordings: listed and downloaded (decrypted as they stream) by
the owner only, deleted key first; exported by the operator. Every read and
every refusal is in the access log."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import tracemalloc
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from audit.errors import NotFound
from audit.filestore import DEFAULT_CHUNK_SIZE, HEADER_SIZE
from audit.recordings import (
    FileStore,
    data_key_of,
    finish_recording,
    start_recording,
)
from audit.roles import Role
from audit.schema import access_log, recordings
from server.app_keys import DB_ENGINE, FILE_STORE, MASTER_KEY
from tests.support.cli import assert_one_clear_error, cli_env, run_cli
from tests.support.harness import Harness, Professional, new_consult, stored_recording

CHUNK = DEFAULT_CHUNK_SIZE


class Recorded:
    def __init__(self, owner: Professional, consult_id: str, recording_id: uuid.UUID) -> None:
        self.owner = owner
        self.consult_id = consult_id
        self.id = recording_id

    @property
    def download(self) -> str:
        return f"/api/recordings/{self.id}/download"


async def recorded(harness: Harness, media: Any, *, complete: bool = True) -> Recorded:
    """A therapist (logged in) with a consult and a recording of ``media``."""
    setup = await new_consult(harness)
    recording_id = await stored_recording(harness, setup.consult_id, media, complete=complete)
    return Recorded(setup.therapist, setup.consult_id, recording_id)


async def log_records(harness: Harness) -> list[Any]:
    async with harness.app[DB_ENGINE].connect() as conn:
        return list((await conn.execute(sa.select(access_log).order_by(access_log.c.id))).all())


async def last_record(harness: Harness) -> Any:
    return (await log_records(harness))[-1]


def file_of(harness: Harness, recording_id: uuid.UUID) -> Path:
    return harness.app[FILE_STORE].path(f"{recording_id}.vcenc")


def flip_byte(path: Path, position: int) -> None:
    damaged = bytearray(path.read_bytes())
    damaged[position] ^= 0x01
    path.write_bytes(bytes(damaged))


def chunk_offset(index: int) -> int:
    """Where the ciphertext of full chunk ``index`` sits in a file."""
    return HEADER_SIZE + index * (5 + CHUNK + 16) + 5


async def test_the_owner_lists_and_downloads_exactly_what_was_recorded(harness: Harness) -> None:
    media = os.urandom(3 * CHUNK + 1234)
    rec = await recorded(harness, media)

    listing = await harness.client.get("/api/recordings")
    assert listing.status == 200, await listing.text()
    (entry,) = (await listing.json())["recordings"]
    assert entry == {
        "id": str(rec.id),
        "consult_id": rec.consult_id,
        "created_at": entry["created_at"],
        "ended_at": entry["ended_at"],
        "status": "complete",
        "duration_s": 60.0,
        "consent": None,
        "stop_reason": "stopped_by_therapist",
        "plaintext_bytes": len(media),
    }

    response = await harness.client.get(rec.download)
    assert response.status == 200, await response.text()
    assert response.content_type == "video/x-matroska"
    started = datetime.fromisoformat(entry["created_at"])
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="recording-{started:%Y%m%d-%H%M}-{rec.id}.mkv"'
    )
    assert response.headers["X-Recording-Status"] == "complete"
    assert "Content-Length" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"
    assert await response.read() == media

    *_, listed, downloaded = await log_records(harness)
    assert (listed.action, listed.object_id, listed.outcome) == (
        "recording.list",
        str(rec.owner.account_id),
        "allowed",
    )
    assert (
        downloaded.action,
        downloaded.actor_id,
        downloaded.object_type,
        downloaded.object_id,
        downloaded.outcome,
    ) == ("recording.download", rec.owner.account_id, "recording", str(rec.id), "allowed")


async def test_a_webm_recording_downloads_as_webm(harness: Harness) -> None:
    """The pass-through recorder writes WebM for VP8: the download says so, from
    the file's own header (older recordings stay Matroska)."""
    header = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\xf2\x81\x04"
    media = header + b"\x42\xf3\x81\x08\x42\x82\x84webm" + os.urandom(2 * CHUNK)
    rec = await recorded(harness, media)
    response = await harness.client.get(rec.download)
    assert response.status == 200, await response.text()
    assert response.content_type == "video/webm"
    assert response.headers["Content-Disposition"].endswith(f'-{rec.id}.webm"')
    assert await response.read() == media


async def test_the_list_holds_only_the_therapists_own_recordings(harness: Harness) -> None:
    rec = await recorded(harness, b"mine")
    other = await new_consult(harness, "bram@praktijk-noord.example")
    others = await stored_recording(harness, other.consult_id, b"not mine")
    listing = await (await harness.client.get("/api/recordings")).json()
    assert [entry["id"] for entry in listing["recordings"]] == [str(others)]
    await harness.logged_in(rec.owner)
    listing = await (await harness.client.get("/api/recordings")).json()
    assert [entry["id"] for entry in listing["recordings"]] == [str(rec.id)]


@pytest.mark.parametrize(
    ("role", "organisation", "status"),
    [
        (Role.THERAPIST, "Praktijk Noord", 403),
        (Role.SUPPORT, "Praktijk Noord", 403),
        (Role.ADMIN, "Praktijk Noord", 403),
        # Another organisation's recording is not there at all, for them.
        (Role.THERAPIST, "Praktijk Zuid", 404),
    ],
)
async def test_nobody_but_the_owner_downloads_or_deletes_and_each_refusal_is_logged(
    harness: Harness, role: Role, organisation: str, status: int
) -> None:
    media = os.urandom(1000)
    rec = await recorded(harness, media)
    someone = await harness.professional("someone@example.org", role, organisation)
    await harness.logged_in(someone)

    response = await harness.client.get(rec.download)
    assert response.status == status, await response.text()
    assert media not in await response.read()
    refusal = await last_record(harness)
    assert (refusal.actor_id, refusal.action, refusal.outcome) == (
        someone.account_id,
        "recording.download",
        "refused",
    )
    if role is Role.THERAPIST:
        assert refusal.object_id == str(rec.id)

    deleted = await harness.client.delete(f"/api/recordings/{rec.id}", headers=harness.headers)
    assert deleted.status == status
    refusal = await last_record(harness)
    assert (refusal.actor_id, refusal.action, refusal.outcome) == (
        someone.account_id,
        "recording.delete",
        "refused",
    )
    assert file_of(harness, rec.id).exists()
    await harness.logged_in(rec.owner)
    assert await (await harness.client.get(rec.download)).read() == media


async def test_an_unknown_recording_is_404_and_the_refusal_is_logged(harness: Harness) -> None:
    setup = await new_consult(harness)
    unknown = uuid.uuid4()
    response = await harness.client.get(f"/api/recordings/{unknown}/download")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
    refusal = await last_record(harness)
    assert (refusal.actor_id, refusal.object_id, refusal.outcome) == (
        setup.therapist.account_id,
        str(unknown),
        "refused",
    )
    assert (await harness.client.get("/api/recordings/not-a-uuid/download")).status == 404


async def test_without_login_or_from_another_site_nothing_is_read_or_deleted(
    harness: Harness,
) -> None:
    rec = await recorded(harness, os.urandom(1000))
    # Another site's page, with the therapist's cookie: the delete is refused.
    forged = await harness.client.delete(
        f"/api/recordings/{rec.id}", headers={"Origin": "https://evil.example"}
    )
    assert forged.status == 403
    assert file_of(harness, rec.id).exists()
    harness.client.session.cookie_jar.clear()
    for method, path in (
        ("GET", "/api/recordings"),
        ("GET", rec.download),
        ("DELETE", f"/api/recordings/{rec.id}"),
    ):
        response = await harness.client.request(method, path, headers=harness.headers)
        assert response.status == 401, (method, path)
        assert (await response.json())["error"]["code"]
    assert file_of(harness, rec.id).exists()
    async with harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(recordings)) == 1


async def test_a_flipped_byte_makes_the_transfer_fail(harness: Harness) -> None:
    media = os.urandom(8 * CHUNK)
    rec = await recorded(harness, media)
    flip_byte(file_of(harness, rec.id), chunk_offset(5) + 100)

    with capture_logs() as logged:
        response = await harness.client.get(rec.download)
        # The first chunks were good and went out; then the connection is cut.
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    (damage,) = [entry for entry in logged if "damaged" in entry["event"]]
    assert damage["recording_id"] == str(rec.id)
    assert "chunk 5 fails authentication" in damage["error"]
    # The process log names the recording by its pseudonymous id, nobody by name or address.
    assert rec.owner.email not in repr(logged)
    assert "127.0.0.1" not in repr(logged)
    *_, granted, failed = await log_records(harness)
    assert (granted.action, granted.outcome) == ("recording.download", "allowed")
    assert (failed.action, failed.object_id) == ("recording.download.failed", str(rec.id))


async def test_a_damaged_first_chunk_is_an_error_before_any_byte(harness: Harness) -> None:
    rec = await recorded(harness, os.urandom(2 * CHUNK))
    flip_byte(file_of(harness, rec.id), chunk_offset(0) + 7)
    response = await harness.client.get(rec.download)
    assert response.status == 500
    error = (await response.json())["error"]
    assert error["code"] == "recording_unreadable"
    assert "damaged" in error["message"]
    assert (await last_record(harness)).action == "recording.download.failed"


async def test_an_incomplete_recording_downloads_up_to_its_last_whole_chunk(
    harness: Harness,
) -> None:
    media = os.urandom(3 * CHUNK + CHUNK // 2)
    rec = await recorded(harness, media, complete=False)
    response = await harness.client.get(rec.download)
    assert response.status == 200
    assert response.headers["X-Recording-Status"] == "incomplete"
    assert await response.read() == media[: 3 * CHUNK]
    assert (await last_record(harness)).action == "recording.download"


async def test_a_finished_recording_whose_file_was_cut_fails_the_transfer(
    harness: Harness,
) -> None:
    media = os.urandom(4 * CHUNK)
    rec = await recorded(harness, media)
    path = file_of(harness, rec.id)
    path.write_bytes(path.read_bytes()[: chunk_offset(3)])
    response = await harness.client.get(rec.download)
    assert response.status == 200
    assert response.headers["X-Recording-Status"] == "complete"
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_a_large_download_streams_without_holding_the_file(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    piece_bytes, pieces = 1024 * 1024, 40
    expected = hashlib.sha256()

    def media() -> Any:
        for _ in range(pieces):
            piece = os.urandom(piece_bytes)
            expected.update(piece)
            yield piece

    rec = await recorded(harness, media())
    largest_write = 0
    original_write = aiohttp.web.StreamResponse.write

    async def counting_write(self: aiohttp.web.StreamResponse, data: Any) -> None:
        nonlocal largest_write
        largest_write = max(largest_write, len(data))
        await original_write(self, data)

    monkeypatch.setattr(aiohttp.web.StreamResponse, "write", counting_write)

    received, got = 0, hashlib.sha256()
    tracemalloc.start()
    try:
        response = await harness.client.get(rec.download)
        assert response.status == 200
        async for block in response.content.iter_chunked(64 * 1024):
            received += len(block)
            got.update(block)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == piece_bytes * pieces
    assert got.hexdigest() == expected.hexdigest()
    # The file is 40 MiB; server and client together stay far below it.
    assert peak_bytes < 8 * 1024 * 1024, peak_bytes
    assert largest_write == CHUNK


async def test_delete_destroys_the_key_then_the_file(harness: Harness) -> None:
    rec = await recorded(harness, os.urandom(1000))
    deleted = await harness.client.delete(f"/api/recordings/{rec.id}", headers=harness.headers)
    assert deleted.status == 204
    assert not file_of(harness, rec.id).exists()
    async with harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(recordings)) == 0
    logged = await last_record(harness)
    assert (logged.action, logged.object_id, logged.outcome) == (
        "recording.delete",
        str(rec.id),
        "allowed",
    )
    assert (await harness.client.get(rec.download)).status == 404


async def test_a_file_that_cannot_be_removed_is_already_unreadable(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = await recorded(harness, os.urandom(1000))

    def refuse(self: FileStore, names: Any) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(FileStore, "delete_files", refuse)
    deleted = await harness.client.delete(f"/api/recordings/{rec.id}", headers=harness.headers)
    assert deleted.status == 204
    # The file is still there, but its key went first: nothing opens it.
    assert file_of(harness, rec.id).exists()
    async with harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(recordings)) == 0
        with pytest.raises(NotFound):
            await data_key_of(conn, harness.app[MASTER_KEY].key, rec.id)


async def test_a_running_recording_is_neither_downloaded_nor_deleted(harness: Harness) -> None:
    setup = await new_consult(harness)
    engine = harness.app[DB_ENGINE]
    async with engine.begin() as conn:
        recording, writer = await start_recording(
            conn,
            harness.app[FILE_STORE],
            harness.app[MASTER_KEY].key,
            uuid.UUID(setup.consult_id),
            now=harness.clock.now(),
        )
    writer.write(os.urandom(2 * CHUNK))
    response = await harness.client.get(f"/api/recordings/{recording.id}/download")
    assert response.status == 409
    assert "still running" in (await response.json())["error"]["message"]
    assert (await last_record(harness)).outcome == "refused"
    deleted = await harness.client.delete(
        f"/api/recordings/{recording.id}", headers=harness.headers
    )
    assert deleted.status == 409
    async with engine.begin() as conn:
        await finish_recording(conn, recording.id, writer, now=harness.clock.now())
    assert (await harness.client.get(f"/api/recordings/{recording.id}/download")).status == 200


async def operator_actions(harness: Harness) -> list[tuple[str, str | None, str]]:
    return [
        (row.action, row.object_id, row.client_type)
        for row in await log_records(harness)
        if row.actor_role == "operator" and row.action.startswith("recording.")
    ]


@pytest.mark.slow  # runs the command line in processes of its own
async def test_the_operator_exports_lists_and_deletes_on_the_command_line(
    harness: Harness, data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    media = os.urandom(2 * CHUNK + 99)
    rec = await recorded(harness, media)
    env = cli_env(data_dir, database_url=database_url)

    async def cli(*args: str) -> Any:
        return await asyncio.to_thread(run_cli, "recording", *args, env=env)

    listed = await cli("list", "--org", "Praktijk Noord")
    assert listed.returncode == 0, listed.stderr
    assert f"{rec.id}  consult {rec.consult_id}" in listed.stdout
    assert f"complete    {len(media)} bytes" in listed.stdout

    out = tmp_path / "export.mkv"
    exported = await cli("export", str(rec.id), str(out))
    assert exported.returncode == 0, exported.stderr
    assert out.read_bytes() == media
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    again = await cli("export", str(rec.id), str(out))
    assert again.returncode == 1
    assert_one_clear_error(again, str(out), "exists", "never overwrites")
    assert out.read_bytes() == media

    deleted = await cli("delete", str(rec.id))
    assert deleted.returncode == 0, deleted.stderr
    assert not file_of(harness, rec.id).exists()
    gone = await cli("export", str(rec.id), str(tmp_path / "gone.mkv"))
    assert_one_clear_error(gone, "no such recording")
    assert not (tmp_path / "gone.mkv").exists()

    assert await operator_actions(harness) == [
        ("recording.list", str(rec.owner.organisation.id), "cli"),
        ("recording.export", str(rec.id), "cli"),
        ("recording.delete", str(rec.id), "cli"),
    ]


@pytest.mark.slow  # runs the command line in processes of its own
async def test_an_export_is_all_or_nothing(
    harness: Harness, data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    env = cli_env(data_dir, database_url=database_url)
    setup = await new_consult(harness)
    damaged = await stored_recording(harness, setup.consult_id, os.urandom(4 * CHUNK))
    flip_byte(file_of(harness, damaged), chunk_offset(2))
    media = os.urandom(2 * CHUNK + 10)
    cut = await stored_recording(harness, setup.consult_id, media, complete=False)

    out = tmp_path / "damaged.mkv"
    failed = await asyncio.to_thread(
        run_cli, "recording", "export", str(damaged), str(out), env=env
    )
    assert failed.returncode == 1
    assert_one_clear_error(failed, "chunk 2 fails authentication", "nothing was exported")
    assert not out.exists()

    out = tmp_path / "cut.mkv"
    partial = await asyncio.to_thread(run_cli, "recording", "export", str(cut), str(out), env=env)
    assert partial.returncode == 0, partial.stderr
    assert "is incomplete" in partial.stderr
    assert out.read_bytes() == media[: 2 * CHUNK]

    assert await operator_actions(harness) == [
        ("recording.export", str(damaged), "cli"),
        ("recording.export.failed", str(damaged), "cli"),
        ("recording.export", str(cut), "cli"),
    ]


async def test_a_head_request_decrypts_nothing_and_logs_nothing(harness: Harness) -> None:
    rec = await recorded(harness, os.urandom(1000))
    before = len(await log_records(harness))
    response = await harness.client.head(rec.download)
    assert response.status == 405
    assert len(await log_records(harness)) == before


async def test_a_missing_file_is_an_error_before_any_byte(harness: Harness) -> None:
    rec = await recorded(harness, os.urandom(1000))
    file_of(harness, rec.id).unlink()
    response = await harness.client.get(rec.download)
    assert response.status == 500
    assert (await response.json())["error"]["code"] == "recording_unreadable"
    assert (await last_record(harness)).action == "recording.download.failed"
