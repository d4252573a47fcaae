"""The recorder works in a process of its own, one per recording.

A worker that is killed ends its recording as ``recorder_failed`` and the
consult goes on; the next recording gets a fresh worker; a worker that hangs
on stop is killed; a worker whose parent dies exits by itself
(signaling/recorder_proxy.py, signaling/recorder_worker.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog.testing

from audit.recordings import StopReason
from audit.schema import recordings
from server.app_keys import DATA_DIR, DB_ENGINE, ROOMS
from signaling.recorder_proxy import WorkerRecorder
from tests.support.harness import Harness, Sockets
from tests.support.recording import (
    ask_and_agree,
    both_see,
    consent_and_connect,
    data_key,
    decrypted,
    grown_to,
    start_call,
    tolerant_counts,
)
from tests.support.webrtc import all_receive_media

pytestmark = [pytest.mark.webrtc, pytest.mark.recorder]


def worker_pid(harness: Harness, consult_id: uuid.UUID | str) -> int:
    pid = harness.app[ROOMS].recording.worker_pid(uuid.UUID(str(consult_id)))
    assert pid is not None
    return pid


def has_exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (exited, not yet reaped by whoever adopted it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


async def exits(pid: int, *, within_s: float) -> None:
    for _ in range(int(within_s / 0.1)):
        if has_exited(pid):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"process {pid} still runs after {within_s:g} s")


async def rows(harness: Harness) -> list[sa.Row[tuple[object, ...]]]:
    """The recordings, once none is still being finished (the worker's exit comes first)."""
    for _ in range(150):
        async with harness.app[DB_ENGINE].connect() as conn:
            found = list(
                (await conn.execute(sa.select(recordings).order_by(recordings.c.created_at))).all()
            )
        if all(row.status != "recording" for row in found):
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"a recording is still being finished: {found}")


async def test_a_killed_worker_ends_the_recording_as_failed_and_the_next_gets_a_fresh_one(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        on = await consent_and_connect(call)
        first = worker_pid(sqlite_harness, call.setup.consult_id)
        assert first != os.getpid()
        written = sqlite_harness.app[DATA_DIR] / "recordings" / f"{on['recording']}.vcenc"
        await grown_to(written, 24 * 1024, within_s=60)
        os.kill(first, signal.SIGKILL)
        for off in await both_see(call, "off"):
            assert off["reason"] == "recorder_failed"
        # The consult goes on: signaling answers, media keeps flowing.
        for side in (call.therapist, call.patient):
            await side.send("ping")
            await side.expect("pong")
        before = sum(call.therapist.peer.frames.values())
        await all_receive_media(call.therapist.peer, at_least=before + 20)
        assert sqlite_harness.app[ROOMS].recording.live_count == 0

        # The next recording works, in a fresh worker.
        await consent_and_connect(call)
        second = worker_pid(sqlite_harness, call.setup.consult_id)
        assert second not in (first, os.getpid())
        await asyncio.sleep(1.5)
        await call.therapist.send("record-stop")
        for off in await both_see(call, "off"):
            assert off["reason"] == "stopped_by_therapist"
        await exits(second, within_s=10)

    by_reason = {row.stop_reason: row for row in await rows(sqlite_harness)}
    cut, whole = by_reason["recorder_failed"], by_reason["stopped_by_therapist"]
    assert (cut.status, cut.stop_reason) == ("incomplete", "recorder_failed")
    assert cut.ended_at is not None
    media, report = decrypted(sqlite_harness, cut.id, await data_key(sqlite_harness, cut.id))
    # What reached the disk reads, up to the last whole chunk, and plays.
    assert report is not None
    assert "decrypted before the cut" in report
    # The size listed is what a download gets: the whole chunks on disk, not
    # the worker's last count (which held bytes it never wrote).
    assert cut.plaintext_bytes == len(media)
    counts = tolerant_counts(media)
    assert counts["video"] > 10, counts
    assert counts["audio"] > 10, counts
    assert (whole.status, whole.stop_reason) == ("complete", "stopped_by_therapist")
    media, report = decrypted(sqlite_harness, whole.id, await data_key(sqlite_harness, whole.id))
    assert report is None
    assert tolerant_counts(media)["audio"] > 10


async def test_the_recording_is_made_outside_the_server_process(
    sqlite_harness: Harness, sqlite_sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_peer_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("a recorder peer connection in the server's process")

    # The test's own peers are aiortc's too; only the recorder's name is barred.
    monkeypatch.setattr("signaling.recorder.RTCPeerConnection", no_peer_here)
    monkeypatch.setattr("signaling.recorder.ConsultRecorder.__init__", no_peer_here)
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        on = await consent_and_connect(call)
        pid = worker_pid(sqlite_harness, call.setup.consult_id)
        assert pid != os.getpid()
        # The data key went to it over its stdin only: not in its arguments
        # or its environment.
        key = await data_key(sqlite_harness, uuid.UUID(on["recording"]))
        for exposed in ("cmdline", "environ"):
            seen = Path(f"/proc/{pid}/{exposed}").read_bytes()
            assert key not in seen
            assert key.hex().encode() not in seen
        await asyncio.sleep(1.5)
        await call.therapist.send("record-stop")
        await both_see(call, "off")
    (row,) = await rows(sqlite_harness)
    assert (row.status, row.stop_reason) == ("complete", "stopped_by_therapist")
    media, report = decrypted(sqlite_harness, row.id, await data_key(sqlite_harness, row.id))
    assert report is None
    assert tolerant_counts(media)["video"] > 10


async def test_the_worker_is_not_handed_the_servers_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found in review: the worker, the one process that parses media from
    # the network, was started with the server's whole environment, where
    # the deployment puts the root master key (which unwraps every
    # recording's data key), the database's password and the TURN secret.
    # It is given what Python and the system need, and nothing else.
    secrets = {
        "VIDEOCONSULT_SECURITY_MASTER_KEY": base64.b64encode(b"R" * 32).decode(),
        "VIDEOCONSULT_DATABASE_URL": "postgresql+asyncpg://vc:s3cret-pw@db/videoconsult",
        "VIDEOCONSULT_TURN_SECRET": "turn-shared-s3cret",
        "CLOUD_STORAGE_TOKEN": "another-s3cret-of-the-host",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TZ", "Europe/Amsterdam")

    async def failed(failure: object, detail: str) -> None:
        raise AssertionError(f"the worker failed: {failure} {detail}")

    recorder = WorkerRecorder(on_failure=failed)
    recorder.launch()
    try:
        await recorder.ready()
        assert recorder.pid is not None
        environ = Path(f"/proc/{recorder.pid}/environ").read_bytes().split(b"\0")
        handed = {entry.partition(b"=")[0].decode() for entry in environ if entry}
        assert not handed & set(secrets), handed
        assert "PATH" in handed
        assert b"TZ=Europe/Amsterdam" in environ
    finally:
        await recorder.stop()


async def test_a_shutdown_waits_for_recordings_already_stopping(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    """A recording a consult's end is stopping has left the node's live
    recordings, but its file and worker are not done yet: stopping all (the
    server's shutdown) waits for them, so no worker outlives the server's
    stop (one did, and was found by the garbage collector in a later test)."""
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await consent_and_connect(call)
        control = sqlite_harness.app[ROOMS].recording
        pid = worker_pid(sqlite_harness, call.setup.consult_id)
        stopping = asyncio.create_task(
            control.stop(uuid.UUID(call.setup.consult_id), StopReason.CONSULT_ENDED)
        )
        # Told "off" once it has left the live ones; its file and worker are next.
        await both_see(call, "off")
        await control.stop_all(StopReason.SERVER_RESTART)
        assert has_exited(pid)
        assert stopping.done()
    (row,) = await rows(sqlite_harness)
    assert row.stop_reason == "consult_ended"


async def test_a_worker_that_hangs_on_stop_is_killed(
    sqlite_harness: Harness, sqlite_sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("signaling.recorder_proxy.STOP_TIMEOUT_S", 1.0)
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await consent_and_connect(call)
        pid = worker_pid(sqlite_harness, call.setup.consult_id)
        await asyncio.sleep(1.0)
        os.kill(pid, signal.SIGSTOP)  # it answers nothing from now on
        await call.therapist.send("record-stop")
        for off in await both_see(call, "off"):
            assert off["reason"] == "stopped_by_therapist"
        await exits(pid, within_s=10)
        for side in (call.therapist, call.patient):
            await side.send("ping")
            await side.expect("pong")
    (row,) = await rows(sqlite_harness)
    assert (row.status, row.stop_reason) == ("incomplete", "stopped_by_therapist")


PARENT = """
import asyncio
from signaling.recorder_proxy import WorkerRecorder

async def failed(failure, detail):
    pass

async def main():
    recorder = WorkerRecorder(on_failure=failed)
    await recorder.ready()
    print("WORKER", recorder.pid, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_a_worker_whose_parent_dies_exits_by_itself() -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        line = b""
        while not line.startswith(b"WORKER "):  # its log lines go to stdout too
            line = await asyncio.wait_for(parent.stdout.readline(), 60)
            assert line, "the parent ended before its worker was ready"
        worker = int(line.split()[1])
        assert not has_exited(worker)
        parent.kill()
        await parent.wait()
        await exits(worker, within_s=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            parent.kill()
        await parent.wait()


async def test_the_workers_log_lines_reach_the_servers_log() -> None:
    async def failed(failure: object, detail: str) -> None:
        raise AssertionError(f"no failure expected: {failure} {detail}")

    recorder = WorkerRecorder(on_failure=failed)
    with structlog.testing.capture_logs() as logs:
        await recorder.ready()
        pid = recorder.pid
        result = await recorder.stop()
    assert not result.complete  # nothing was started
    forwarded = [entry for entry in logs if entry.get("worker_pid") == pid]
    assert {"recorder worker started", "recorder worker done"} <= {
        entry["event"] for entry in forwarded
    }, logs
    assert pid is not None
    assert has_exited(pid)


async def test_a_worker_that_does_not_start_fails_the_recording_and_the_consult_goes_on(
    sqlite_harness: Harness, sqlite_sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("signaling.recorder_proxy.WORKER_COMMAND", ("/nonexistent/python",))
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await ask_and_agree(call)
        for off in await both_see(call, "off"):
            assert off["reason"] == "recorder_failed"
        for side in (call.therapist, call.patient):
            await side.send("ping")
            await side.expect("pong")
        assert sqlite_harness.app[ROOMS].recording.live_count == 0
    assert await rows(sqlite_harness) == []
