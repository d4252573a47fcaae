"""Recording faults, for real: a full disk, and a server killed mid-recording.

The full disk is a real one: a 2 MiB tmpfs mounted over the file store's
directory (root only; elsewhere the test skips, and fails under CI=true).
The killed server is a real ``videoconsult serve`` process, killed with
SIGKILL while it records, and started again on the same data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import av
import pytest
import sqlalchemy as sa
import structlog.testing
from aiohttp import ClientSession

import signaling.recording as recording_module
from audit.clock import ManualClock
from audit.filestore import Truncated
from audit.recordings import FileStore, StopReason, data_key_of, plaintext
from audit.schema import recordings
from server.app_keys import DATA_DIR, DB_ENGINE, FILE_STORE, MASTER_KEY, ROOMS
from signaling.recording import RecordingControl, _Live
from tests.support.harness import Harness, Sockets, admitted_pair, new_consult, receive
from tests.support.processes import ServerProcess, session_cookie
from tests.support.recording import (
    Call,
    both_see,
    consent_and_connect,
    expect_recording,
    grown_to,
    recording_row,
    start_call,
    tolerant_counts,
)
from tests.support.services import service_unavailable
from tests.support.webrtc import Peer, Signaller, all_receive_media, opened

pytestmark = [pytest.mark.webrtc, pytest.mark.recorder]

# Small enough to fill within a few seconds of what the two noisy cameras
# send (the recorder copies their VP8, some hundreds of kbit/s each), large
# enough for the file's header and several whole chunks.
TMPFS_SIZE = "512k"


@pytest.fixture
def full_disk_store(sqlite_harness: Harness) -> Iterator[Path]:
    """The file store's directory on a tiny tmpfs of its own."""
    store_dir: Path = sqlite_harness.app[FILE_STORE].root
    store_dir.mkdir(mode=0o700, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(store_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        service_unavailable("a small tmpfs (root)", mounted.stderr.strip() or "mount failed")
    try:
        yield store_dir
    finally:
        subprocess.run(["umount", "-l", str(store_dir)], check=False)


def read_cut(store: FileStore, recording_id: uuid.UUID, key: bytes) -> tuple[bytes, str]:
    """Everything that decrypts, and the truncation report (which must come)."""
    parts: list[bytes] = []
    with pytest.raises(Truncated) as cut:
        parts.extend(plaintext(store, f"{recording_id}.vcenc", key, recording_id))
    assert cut.value.plaintext_bytes == sum(map(len, parts))
    return b"".join(parts), str(cut.value)


async def test_a_full_disk_stops_the_recording_cleanly_and_the_consult_goes_on(
    sqlite_harness: Harness, sqlite_sockets: Sockets, full_disk_store: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await consent_and_connect(call, noisy=True)
        for side in (call.therapist, call.patient):
            off = await expect_recording(side, "off")
            assert off["reason"] == "storage_full"
        # Both still in the consult: signaling answers, media keeps flowing.
        for side in (call.therapist, call.patient):
            await side.send("ping")
            await side.expect("pong")
        before = sum(call.therapist.peer.frames.values())
        await all_receive_media(call.therapist.peer, at_least=before // 2 + 20)
        # And the therapist may ask again (it fails again, cleanly, on this disk).
        assert sqlite_harness.app[ROOMS].recording.live_count == 0

    row = await recording_row(sqlite_harness)
    assert (row.status, row.stop_reason) == ("incomplete", "storage_full")
    async with sqlite_harness.app[DB_ENGINE].connect() as conn:
        _name, key = await data_key_of(conn, sqlite_harness.app[MASTER_KEY].key, row.id)
    media, report = read_cut(FileStore(full_disk_store), row.id, key)
    assert "without its final chunk" in report or "inside chunk" in report
    assert len(media) >= 64 * 1024  # at least the first whole chunk
    # The size listed is what a download gets, not what the recorder was
    # handed (the bytes buffered when the disk filled never reached it).
    assert row.plaintext_bytes == len(media)
    # What made it to the disk plays: the streams' header and whole clusters.
    counts = tolerant_counts(media)
    assert counts["video"] > 0, counts
    assert counts["audio"] > 0, counts


# -- the server killed mid-recording ----------------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    # The server process runs on the real clock: sessions and invites made
    # through the harness must be fresh by that clock too.
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


async def test_a_recording_cut_by_a_killed_server_is_marked_incomplete_and_still_plays(
    sqlite_harness: Harness, free_port: int, tmp_path: Path
) -> None:
    setup = await new_consult(sqlite_harness)
    cookie = session_cookie(sqlite_harness)
    data_dir = sqlite_harness.app[DATA_DIR]
    log = tmp_path / "server.log"
    server = ServerProcess(data_dir, free_port, log)
    try:
        await asyncio.to_thread(server.wait_healthy)
        headers = {"Origin": server.origin}
        async with contextlib.AsyncExitStack() as stack:
            therapist_http = await stack.enter_async_context(ClientSession())
            patient_http = await stack.enter_async_context(ClientSession())
            therapist_socket = await therapist_http.ws_connect(
                f"{server.origin}/ws?consult={setup.consult_id}",
                headers={**headers, "Cookie": f"vc_session={cookie}"},
            )
            await receive(therapist_socket, "welcome")
            async with patient_http.post(
                f"{server.origin}/api/invites/{setup.invite_token}/ticket",
                json={"consent": True},
                headers=headers,
            ) as answer:
                assert answer.status == 200, await answer.text()
                ticket = (await answer.json())["ticket"]
            patient_socket = await patient_http.ws_connect(
                f"{server.origin}/ws?ticket={ticket}", headers=headers
            )
            await receive(patient_socket, "welcome")
            await receive(therapist_socket, "patient-waiting")
            therapist = opened(stack, Peer("therapist"))
            patient = opened(stack, Peer("patient"))
            call = Call(
                setup,
                opened(stack, Signaller(therapist_socket, therapist)),
                opened(stack, Signaller(patient_socket, patient)),
                stack,
            )
            await call.therapist.send("admit")
            await call.patient.expect("admitted")
            await call.therapist.expect("peer-joined")
            await call.therapist.send("offer", sdp=await therapist.offer())
            await all_receive_media(therapist, patient)
            on = await consent_and_connect(call)
            # Killed once a few chunks are on disk (not after a fixed time:
            # a busy host records more slowly, and a cut too early holds
            # nothing that plays).
            # About two seconds of both parties' media, here.
            written = data_dir / "recordings" / f"{on['recording']}.vcenc"
            await grown_to(written, 24 * 1024, within_s=60)
            server.kill()

        recording_id = uuid.UUID(on["recording"])
        async with sqlite_harness.app[DB_ENGINE].connect() as conn:
            status = await conn.scalar(
                sa.select(recordings.c.status).where(recordings.c.id == recording_id)
            )
        assert status == "recording"  # nobody finished it

        # The restart marks it incomplete, before anything else.
        server = ServerProcess(data_dir, free_port, log)
        await asyncio.to_thread(server.wait_healthy)
    finally:
        server.stop()

    row = await recording_row(sqlite_harness)
    assert (row.status, row.stop_reason) == ("incomplete", "server_restart")
    assert row.ended_at is not None
    assert "marked incomplete" in log.read_text()
    async with sqlite_harness.app[DB_ENGINE].connect() as conn:
        _name, key = await data_key_of(conn, sqlite_harness.app[MASTER_KEY].key, row.id)
    # The recorder worker saw its parent go (its stdin ended) and closed the
    # file, whole: no orphan went on recording, and nothing was cut. (A worker
    # killed too leaves it cut at its last chunk: tests/test_recording_worker.py.)
    store = FileStore(data_dir / "recordings")
    media = b"".join(plaintext(store, f"{row.id}.vcenc", key, row.id))
    # It plays: both parties' audio and video.
    counts = tolerant_counts(media)
    assert counts["video"] > 30, counts
    assert counts["audio"] > 30, counts
    assert stream_kinds(media) == ["audio", "video", "audio", "video"]


def stream_kinds(media: bytes) -> list[str]:
    """The stream layout of a (cut) file: its header is whole."""
    with av.open(io.BytesIO(media), mode="r") as container:
        return [stream.type for stream in container.streams]


async def test_a_recording_whose_row_could_not_be_finished_at_once_is_finished_later(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    """Found in review: another writer held the database past its busy
    timeout (a long purge, ``keys rotate``) as a recording stopped; marking
    its row finished failed once and was not tried again. The row said
    "recording" until the next start (with several nodes, for good), and the
    whole, readable file could be neither downloaded nor deleted (409 "still
    running; stop it first")."""
    harness = sqlite_harness
    database = Path(harness.app[DATA_DIR]) / "videoconsult.db"
    assert database.exists()
    with structlog.testing.capture_logs() as logs:
        async with contextlib.AsyncExitStack() as stack:
            call = await start_call(harness, sqlite_sockets, stack)
            await consent_and_connect(call)
            await asyncio.sleep(1.5)
            blocker = sqlite3.connect(database, timeout=30, isolation_level=None)
            try:
                blocker.execute("BEGIN IMMEDIATE")  # another writer, for a while
                await call.therapist.send("record-stop")
                await both_see(call, "off")
                for _ in range(300):
                    if any("marking it finished failed" in entry["event"] for entry in logs):
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("the finish did not run into the busy database")
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            for _ in range(100):  # the next try, within a few seconds
                if (await recording_row(harness)).status != "recording":
                    break
                await asyncio.sleep(0.1)
    row = await recording_row(harness)
    assert (row.status, row.stop_reason) == ("complete", "stopped_by_therapist")
    download = await harness.client.get(f"/api/recordings/{row.id}/download")
    assert download.status == 200
    assert len(await download.read()) == row.plaintext_bytes > 0


@dataclass
class Stopped:
    complete: bool = True
    plaintext_bytes: int = 1000
    frames: dict[str, int] = field(default_factory=dict)


class StandInRecorder:
    """What ``_finish`` asks of a worker recorder: its stop."""

    async def stop(self) -> Stopped:
        return Stopped()


class SlowToStopRecorder:
    """A stand-in whose stop takes a moment, as a worker's remux does."""

    async def stop(self) -> Stopped:
        await asyncio.sleep(0.3)
        return Stopped()


def recording_whose_row_cannot_be_finished(
    control: RecordingControl,
    consult_id: uuid.UUID,
    recorder: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A recording running on ``recorder`` (a stand-in) in ``consult_id``,
    whose row the database refuses to mark finished (it went away)."""
    now = control._clock.now()
    control._live[consult_id] = _Live(
        recorder=recorder,  # type: ignore[arg-type]
        requested_at=now,
        recording_id=uuid.uuid4(),
        started_at=now,
    )

    async def database_away(*_args: Any, **_kwargs: Any) -> None:
        raise ConnectionRefusedError("the database went away")

    monkeypatch.setattr(recording_module, "finish_recording", database_away)


async def test_a_row_that_cannot_be_finished_does_not_hold_up_the_consults_end(
    sqlite_harness: Harness, sqlite_sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review of the retries: they ran inside _finish, which
    RecordingControl.stop awaits, so every caller of stop waited them out:
    the consult's end (here: the patient heard 'consult-ended' only after
    about 2 minutes), a leave, a reconnecting participant's join, and the
    therapist's own record-stop. The recorder is a stand-in (what _finish
    asks of a worker: its stop); the database refuses the row's finish."""
    harness = sqlite_harness
    setup, therapist, patient = await admitted_pair(harness, sqlite_sockets)
    consult_id = uuid.UUID(setup.consult_id)
    control = harness.app[ROOMS].recording
    recording_whose_row_cannot_be_finished(control, consult_id, StandInRecorder(), monkeypatch)
    try:
        await therapist.send_json({"v": 1, "type": "end"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        heard: list[str] = []
        while "consult-ended" not in heard:
            left = deadline - loop.time()
            assert left > 0, f"no consult-ended within 5 s; heard {heard}"
            try:
                heard.append((await patient.receive_json(timeout=left))["type"])
            except TimeoutError:
                raise AssertionError(
                    f"the patient was not told the consult ended within 5 s (heard {heard}): "
                    "the end waits for finish_recording's retries"
                ) from None
    finally:
        control._closing.set()
        await asyncio.gather(*control._finishing, return_exceptions=True)


async def test_a_shutdown_waits_for_the_last_try_of_a_row_it_could_not_finish(
    sqlite_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown waits for the recordings already stopping (a consult's
    end); a row that then cannot be marked finished gets its one more try
    before the shutdown goes on, not a try left pending in a loop that is
    about to close (found in review: the try made after the shutdown had
    taken its list of what to wait for was not waited for)."""
    control = sqlite_harness.app[ROOMS].recording
    consult_id = uuid.uuid4()
    recording_whose_row_cannot_be_finished(control, consult_id, SlowToStopRecorder(), monkeypatch)
    with structlog.testing.capture_logs() as logs:
        # The consult ends (its recording stopping), and the server stops.
        ending = asyncio.ensure_future(control.stop(consult_id, StopReason.CONSULT_ENDED))
        await asyncio.sleep(0.05)
        await asyncio.wait_for(control.stop_all(StopReason.SERVER_RESTART), 10)
        events = [entry["event"] for entry in logs]
    assert events.count("recording: marking it finished failed") == 2, events
    assert "recording: marking it finished failed; no more tries" in events
    await ending
