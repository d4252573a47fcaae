"""Consented recording with real WebRTC peers: consent, the recorder, the file.

Two aiortc peer connections play the therapist's and the patient's browser
(tests/test_webrtc.py); for the recording each opens a second, send-only
peer connection to the server's recorder, as the pages do. The file is then
decrypted from the real encrypted store and opened with PyAV, and every
stream's frames are counted: a file that merely opens can still hold no
video (see signaling/recorder.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from audit.clock import ManualClock
from audit.media_types import WEBM, media_format
from audit.recordings import StopReason, start_recording
from audit.schema import recordings, technical_log
from server.app import create_app
from server.app_keys import DB_ENGINE, FILE_STORE, MASTER_KEY, ROOMS, TECHNICAL_LOG
from server.housekeeping import purge_expired
from signaling.media_codecs import MediaCodec
from signaling.protocol import ParticipantRole
from signaling.recorded_track import ReceivedTrack, StreamKind, Timeline
from signaling.recorder import ConsultRecorder
from signaling.recorder_proxy import WorkerRecorder
from signaling.state import RecordingPhase
from tests.support.harness import Harness, Sockets, admitted_pair, receive
from tests.support.recording import (
    Call,
    RecorderLink,
    ask_and_agree,
    both_see,
    consent_and_connect,
    count_streams,
    data_key,
    decrypted,
    expect_recording,
    finished_recording_row,
    linked,
    recording_row,
    start_call,
)
from tests.support.settings import SettingsFactory

pytestmark = [pytest.mark.webrtc, pytest.mark.recorder]

RECORD_FOR_S = 5.0


async def test_a_consented_recording_holds_audio_and_video_of_both_parties(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        on = await consent_and_connect(call)
        began = time.monotonic()
        await asyncio.sleep(RECORD_FOR_S)
        await call.therapist.send("record-stop")
        # The truth: from the moment both were told "on" to the stop.
        truth_s = time.monotonic() - began
        for side in (call.therapist, call.patient):
            off = await expect_recording(side, "off")
            assert off["reason"] == "stopped_by_therapist"
        # The consult goes on after the recording.
        await call.patient.send("ping")
        await call.patient.expect("pong")

    row = await finished_recording_row(sqlite_harness)
    assert str(row.id) == on["recording"]
    assert (row.status, row.stop_reason, row.consent_by) == (
        "complete",
        "stopped_by_therapist",
        "patient",
    )
    assert row.requested_at <= row.consented_at <= row.created_at <= row.ended_at
    media, truncated = decrypted(sqlite_harness, row.id, await data_key(sqlite_harness, row.id))
    assert truncated is None
    assert row.plaintext_bytes == len(media)
    # What the browsers sent, copied: VP8 and Opus in WebM.
    assert media_format(media) == WEBM
    streams = count_streams(media)
    # therapist audio, therapist video, patient audio, patient video
    assert [s.kind for s in streams] == ["audio", "video", "audio", "video"]
    assert [s.codec for s in streams] == ["opus", "vp8", "opus", "vp8"]
    for stream in streams:
        # 30 video frames and 50 audio packets (20 ms of Opus) a second are
        # sent; on a busy machine some are late, but most must be there.
        expected = 30 if stream.kind == "video" else 50
        assert stream.frames >= expected * RECORD_FOR_S * 0.6, streams
        assert abs(stream.duration_s - truth_s) < 0.5, (streams, truth_s)
        assert stream.first_is_keyframe, streams
    # Every picture in the size its camera sent (the therapist's 320x240, the patient's 160x120).
    assert [(s.width, s.height) for s in streams if s.kind == "video"] == [(320, 240), (160, 120)]
    assert sqlite_harness.app[ROOMS].recording.live_count == 0


async def test_without_consent_nothing_is_recorded(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        # No offer to the recorder before the consent.
        link = linked(stack, RecorderLink())
        await call.therapist.send("recorder-offer", sdp=await link.offer())
        error = await call.therapist.expect("error")
        assert (error["code"], error["ref"]) == ("recording_state", "recorder-offer")
        # A patient cannot ask for a recording, nor a therapist consent to one.
        await call.patient.send("record-request")
        assert (await call.patient.expect("error"))["code"] == "not_allowed"
        await call.therapist.send("record-consent", agree=True)
        assert (await call.therapist.expect("error"))["code"] == "not_allowed"
        # Consent without a request is refused.
        await call.patient.send("record-consent", agree=True)
        assert (await call.patient.expect("error"))["code"] == "recording_state"

        await call.therapist.send("record-request")
        await expect_recording(call.therapist, "requested")
        await expect_recording(call.patient, "requested")
        await call.patient.send("record-consent", agree=False)
        for side in (call.therapist, call.patient):
            await expect_recording(side, "refused")
        # The refusal stands: a late "yes" to the old request changes nothing.
        await call.patient.send("record-consent", agree=True)
        assert (await call.patient.expect("error"))["code"] == "recording_state"
        await call.therapist.send("recorder-offer", sdp=await link.offer())
        assert (await call.therapist.expect("error"))["code"] == "recording_state"
        call.therapist.assert_nothing_unexpected()
        call.patient.assert_nothing_unexpected()

    async with sqlite_harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(recordings)) == 0
    store_dir = sqlite_harness.app[FILE_STORE].root
    assert not store_dir.exists() or not any(store_dir.iterdir())
    assert sqlite_harness.app[ROOMS].recording.live_count == 0


async def test_a_late_answer_to_an_earlier_question_is_not_consent_to_the_next(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await call.therapist.send("record-request")
        first = (await both_see(call, "requested"))[1]["request"]
        # Withdrawn and asked again at once: "off" comes before the new question.
        await call.therapist.send("record-stop")
        await call.therapist.send("record-request")
        for side in (call.therapist, call.patient):
            assert (await expect_recording(side, "off"))["reason"] == "stopped_by_therapist"
        second = (await both_see(call, "requested"))[1]["request"]
        assert first != second
        await call.patient.send("record-consent", agree=True, request=first)
        error = await call.patient.expect("error")
        assert (error["code"], error["ref"]) == ("recording_state", "record-consent")
        assert "earlier question" in error["message"]
        await call.patient.send("record-consent", agree=True, request=second)
        await both_see(call, "starting")
        await call.therapist.send("record-stop")
        await both_see(call, "off")


async def test_a_second_device_of_the_patient_stops_the_recording(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await consent_and_connect(call)
        await asyncio.sleep(1.0)
        phone = await sqlite_sockets.patient(call.setup.invite_token)
        await receive(phone, "welcome")  # says "on": the stop comes right after it
        assert (await receive(phone, "recording"))["state"] == "off"
        await call.patient.expect("replaced")
        seen = [await call.therapist.expect("peer-rejoined")]
        seen.append(await expect_recording(call.therapist, "off"))
        assert seen[-1]["reason"] == "participant_left"
    row = await finished_recording_row(sqlite_harness)
    assert (row.status, row.stop_reason) == ("complete", "participant_left")


async def test_a_bad_recorder_offer_gets_a_clear_error_and_the_recording_still_starts(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await ask_and_agree(call)
        for garbage in ("garbage", "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"):
            await call.therapist.send("recorder-offer", sdp=garbage)
            error = await call.therapist.expect("error")
            assert (error["code"], error["ref"]) == ("invalid_message", "recorder-offer")
            assert "recorder offer" in error["message"]
        # A video-only offer is refused too: a recording needs the microphone.
        video_only = linked(stack, RecorderLink())
        video_only.pc.getTransceivers()[0].sender.replaceTrack(None)
        video_only.pc.getTransceivers()[0].direction = "inactive"
        await call.therapist.send("recorder-offer", sdp=await video_only.offer())
        error = await call.therapist.expect("error")
        assert error["code"] == "invalid_message"
        assert "microphone" in error["message"]
        # The offers that follow are fine, and the recording starts.
        for side in (call.therapist, call.patient):
            link = linked(stack, RecorderLink())
            await side.send("recorder-offer", sdp=await link.offer())
            await link.accept((await side.expect("recorder-answer"))["sdp"])
        await expect_recording(call.therapist, "on")
        await expect_recording(call.patient, "on")
        # A second offer of the same participant is refused by state.
        await call.patient.send("recorder-offer", sdp=await linked(stack, RecorderLink()).offer())
        assert (await call.patient.expect("error"))["code"] == "recording_state"
        await call.patient.send("record-stop")
        for side in (call.therapist, call.patient):
            assert (await expect_recording(side, "off"))["reason"] == "stopped_by_patient"
    assert (await finished_recording_row(sqlite_harness)).status == "complete"


@pytest.fixture
async def impatient_harness(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any
) -> Harness:
    """The real app whose recorder waits only 2 s for the browsers' media."""
    app = create_app(make_settings(recording_start_timeout_s=2), clock=clock)
    return Harness(app, await aiohttp_client(app), clock)


async def test_a_recorder_connection_that_never_comes_gives_the_recording_up(
    impatient_harness: Harness,
) -> None:
    sockets = Sockets(impatient_harness)
    try:
        async with contextlib.AsyncExitStack() as stack:
            call = await start_call(impatient_harness, sockets, stack)
            await ask_and_agree(call)
            # Only the therapist's page connects; the patient's never does.
            link = linked(stack, RecorderLink())
            await call.therapist.send("recorder-offer", sdp=await link.offer())
            await link.accept((await call.therapist.expect("recorder-answer"))["sdp"])
            for side in (call.therapist, call.patient):
                assert (await expect_recording(side, "off"))["reason"] == "recorder_failed"
            # The consult goes on, and the therapist may ask again.
            await call.therapist.send("record-request")
            await expect_recording(call.therapist, "requested")
    finally:
        await sockets.close()
    async with impatient_harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(recordings)) == 0
    assert impatient_harness.app[ROOMS].recording.live_count == 0


async def test_a_node_records_no_more_consults_at_once_than_it_may(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any
) -> None:
    app = create_app(make_settings(recording_max_concurrent=1), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    sockets = Sockets(harness)
    try:
        async with contextlib.AsyncExitStack() as stack:
            first = await start_call(harness, sockets, stack)
            second = await start_call(
                harness, sockets, stack, email="second@praktijk-noord.example"
            )
            for call in (first, second):
                await call.therapist.send("record-request")
                for side in (call.therapist, call.patient):
                    await expect_recording(side, "requested")
            await first.patient.send("record-consent", agree=True)
            for side in (first.therapist, first.patient):
                await expect_recording(side, "starting")
            # The one slot is taken: the second consult's consent cannot be carried out.
            await second.patient.send("record-consent", agree=True)
            for side in (second.therapist, second.patient):
                assert (await expect_recording(side, "off"))["reason"] == "server_busy"
            await second.therapist.send("record-request")
            error = await second.therapist.expect("error")
            assert error["code"] == "recording_unavailable"
            assert "1 consults at once" in error["message"]
            # The slot comes free with the first recording's end.
            await first.therapist.send("record-stop")
            for side in (first.therapist, first.patient):
                await expect_recording(side, "off")
            await second.therapist.send("record-request")
            await expect_recording(second.therapist, "requested")
    finally:
        await sockets.close()


async def test_recording_switched_off_refuses_requests(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any
) -> None:
    app = create_app(make_settings(recording_enabled="false"), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    sockets = Sockets(harness)
    try:
        async with contextlib.AsyncExitStack() as stack:
            call = await start_call(harness, sockets, stack)
            await call.therapist.send("record-request")
            error = await call.therapist.expect("error")
            assert error["code"] == "recording_unavailable"
            call.patient.assert_nothing_unexpected()
    finally:
        await sockets.close()


async def test_a_patient_under_16_needs_the_guardians_consent(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack, guardian_consent=True)
        await call.therapist.send("record-request")
        for side in (call.therapist, call.patient):
            assert (await expect_recording(side, "requested"))["guardian_required"] is True
        await call.patient.send("record-consent", agree=True, by="patient")
        assert (await call.patient.expect("error"))["code"] == "guardian_consent_required"
        await call.patient.send("record-consent", agree=True, by="guardian")
        for side in (call.therapist, call.patient):
            await expect_recording(side, "starting")
        # Withdrawn before the media came: nothing was written.
        await call.patient.send("record-stop")
        for side in (call.therapist, call.patient):
            assert (await expect_recording(side, "off"))["reason"] == "stopped_by_patient"
    async with sqlite_harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(recordings)) == 0
    # Found in review: the technical log, which support staff read, said who
    # agreed, and "guardian" tells that the patient is under 16. The consent
    # is noted there without it (the recording's row keeps it, for the
    # therapist).
    await sqlite_harness.app[TECHNICAL_LOG].flush(sqlite_harness.app[DB_ENGINE])
    async with sqlite_harness.app[DB_ENGINE].connect() as conn:
        notes = (
            await conn.execute(
                sa.select(technical_log.c.kind, technical_log.c.detail).where(
                    technical_log.c.subject == str(call.setup.consult_id)
                )
            )
        ).all()
    assert "recording.consented" in [kind for kind, _ in notes]
    assert not [detail for _, detail in notes if "guardian" in json.dumps(detail)], notes


async def test_a_revoked_link_does_not_let_a_patient_under_16_consent_alone(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    # Found in review: only the invite's row said that the patient is under
    # 16. Once the therapist revoked the link of an admitted patient (who
    # stays), the housekeeping deleted that row, and the next record-request
    # took a "yes" from the child alone.
    harness = sqlite_harness
    setup, therapist, patient = await admitted_pair(harness, sqlite_sockets, guardian_consent=True)
    revoked = await harness.client.delete(
        f"/api/consults/{setup.consult_id}/invite", headers=harness.headers
    )
    assert revoked.status == 204
    await purge_expired(harness.app)

    await therapist.send_json({"v": 1, "type": "record-request"})
    for side in (therapist, patient):
        requested = await receive(side, "recording")
        assert requested["state"] == "requested"
        assert requested["guardian_required"] is True
    await patient.send_json({"v": 1, "type": "record-consent", "agree": True, "by": "patient"})
    assert (await receive(patient, "error"))["code"] == "guardian_consent_required"
    async with harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(recordings)) == 0


async def test_a_participant_who_drops_stops_the_recording_and_coming_back_does_not_restart_it(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await consent_and_connect(call, patient_video=None)  # a patient without a camera
        await asyncio.sleep(1.5)
        await call.patient.close()
        await call.therapist.expect("peer-reconnecting")
        off = await expect_recording(call.therapist, "off")
        assert off["reason"] == "participant_left"

        socket = await sqlite_sockets.patient(call.setup.invite_token)
        welcome = await receive(socket, "welcome")
        assert welcome["recording"] == "off"
        await call.therapist.expect("peer-rejoined")
        await asyncio.sleep(0.5)
        call.therapist.assert_nothing_unexpected()
        assert sqlite_harness.app[ROOMS].recording.live_count == 0

    row = await finished_recording_row(sqlite_harness)
    assert (row.status, row.stop_reason) == ("complete", "participant_left")
    media, truncated = decrypted(sqlite_harness, row.id, await data_key(sqlite_harness, row.id))
    assert truncated is None
    streams = count_streams(media)
    assert [s.kind for s in streams] == ["audio", "video", "audio"]
    assert all(s.frames > 10 for s in streams), streams


async def test_ending_the_consult_finishes_the_recording(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await consent_and_connect(call)
        await asyncio.sleep(1.0)
        await call.therapist.send("end")
        for side in (call.therapist, call.patient):
            assert (await expect_recording(side, "off"))["reason"] == "consult_ended"
            await side.expect("consult-ended")
    row = await finished_recording_row(sqlite_harness)
    assert (row.status, row.stop_reason) == ("complete", "consult_ended")


async def agree_connect_and_see_it_withdrawn(call: Call) -> None:
    """The patient agrees, both pages connect their media to the recorder,
    and both are told the patient stopped it (the test stops it meanwhile)."""
    await ask_and_agree(call)
    links = {side: linked(call.stack, RecorderLink()) for side in (call.therapist, call.patient)}
    offers = {side: await link.offer() for side, link in links.items()}
    for side, sdp in offers.items():
        await side.send("recorder-offer", sdp=sdp)
    for side, link in links.items():
        await link.accept((await side.expect("recorder-answer"))["sdp"])
    for side in (call.therapist, call.patient):
        off = await expect_recording(side, "off")
        assert off["reason"] == "stopped_by_patient"


async def test_a_stop_while_the_file_is_being_made_records_nothing(
    sqlite_harness: Harness, sqlite_sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consent withdrawn while the row and file are being made: both are told
    off, and the recorder must not start after that (found in review)."""
    from audit.recordings import begin_recording as made

    stops: list[asyncio.Task[bool]] = []

    async def stopped_meanwhile(*args: Any, **kwargs: Any) -> Any:
        consult_id = args[3]
        stop = sqlite_harness.app[ROOMS].recording.stop(consult_id, StopReason.STOPPED_BY_PATIENT)
        stops.append(asyncio.ensure_future(stop))
        for _ in range(20):  # the stop goes as far as it can: waiting for this
            await asyncio.sleep(0)
        return await made(*args, **kwargs)

    monkeypatch.setattr("signaling.recording.begin_recording", stopped_meanwhile)
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await agree_connect_and_see_it_withdrawn(call)
        assert await stops[0]
        await asyncio.sleep(1.0)  # media keeps coming: none of it may be written
    row = await finished_recording_row(sqlite_harness)
    assert (row.status, row.stop_reason) == ("incomplete", "stopped_by_patient")
    assert not row.plaintext_bytes


async def test_a_stop_while_the_recorder_starts_records_nothing(
    sqlite_harness: Harness, sqlite_sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consent withdrawn while the worker is told to start (after the file was
    made, before "on"): found in review, the stop waited for the start, the
    worker wrote what came until it was told to stop, and the file was kept
    as a complete recording of what followed the patient's "no"."""
    harness = sqlite_harness
    real_start = WorkerRecorder.start
    stops: list[asyncio.Future[bool]] = []

    async def withdrawn_meanwhile(self: WorkerRecorder, file: Any) -> None:
        consult_id = uuid.UUID(call.setup.consult_id)
        stop = harness.app[ROOMS].recording.stop(consult_id, StopReason.STOPPED_BY_PATIENT)
        stops.append(asyncio.ensure_future(stop))
        for _ in range(20):  # the stop goes as far as it can: told off, waiting for this
            await asyncio.sleep(0)
        await real_start(self, file)
        # A busy signaling loop: the worker records while this one catches up.
        await asyncio.sleep(0.5)

    monkeypatch.setattr(WorkerRecorder, "start", withdrawn_meanwhile)
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(harness, sqlite_sockets, stack)
        await agree_connect_and_see_it_withdrawn(call)
        assert await stops[0]
        await asyncio.sleep(1.0)
    row = await finished_recording_row(harness)
    media, _cut = decrypted(harness, row.id, await data_key(harness, row.id))
    assert (row.status, row.stop_reason) == ("incomplete", "stopped_by_patient")
    assert not row.plaintext_bytes
    assert media == b""


# -- the recorder alone --------------------------------------------------------------


async def test_an_offer_still_being_answered_does_not_count_as_connected() -> None:
    """Two pages offer within milliseconds; only answered offers may count,
    or the start waits on a connection that is not there yet."""
    recorder = ConsultRecorder(on_failure=lambda failure, detail: asyncio.sleep(0))
    link = RecorderLink()
    try:
        answering = asyncio.create_task(
            recorder.accept_offer(ParticipantRole.THERAPIST, await link.offer())
        )
        # Until the answer is ready (ICE gathering takes a moment), it is not counted.
        while not answering.done():
            assert recorder.roles == frozenset()
            await asyncio.sleep(0)
        await link.accept(await answering)
        assert recorder.roles == {ParticipantRole.THERAPIST}
    finally:
        await recorder.stop()
        await link.close()


def test_frames_keep_their_spacing_but_count_from_the_start() -> None:
    track = ReceivedTrack(
        role=ParticipantRole.PATIENT,
        kind=StreamKind.AUDIO,
        codec=MediaCodec.OPUS,
        receiver=None,  # type: ignore[arg-type]  # rebased() sends no feedback
        clock_rate=48000,
    )
    timeline = Timeline()
    base = 3_000_000_000  # RTP timestamps start anywhere
    rebased = [track.rebased(base + index * 960, timeline) for index in range(3)]
    assert rebased[0] < 48000  # within a second of the start
    assert [b - a for a, b in itertools.pairwise(rebased)] == [960, 960]
    # A frame that would go back in time is moved just after the last one.
    assert track.rebased(base, timeline) == rebased[-1] + 1


async def on_nodes(harness: Harness, consult_id: str, *, therapist: str, patient: str) -> None:
    """Make the room say its participants are connected to these nodes (as
    they would be with several nodes sharing Redis)."""
    async with harness.app[ROOMS]._store.locked(uuid.UUID(consult_id)) as state:
        assert state is not None
        assert state.therapist is not None
        assert state.patient is not None
        state.therapist = dataclasses.replace(state.therapist, node=therapist)
        state.patient = dataclasses.replace(state.patient, node=patient)


async def test_participants_on_two_server_nodes_cannot_be_recorded(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await on_nodes(sqlite_harness, call.setup.consult_id, therapist="", patient="node-b")
        await call.therapist.send("record-request")
        error = await call.therapist.expect("error")
        assert error["code"] == "recording_unavailable"
        assert "different server nodes" in error["message"]
        call.patient.assert_nothing_unexpected()


async def test_a_recording_on_a_node_that_died_is_marked_incomplete_and_the_other_is_told(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    rooms = sqlite_harness.app[ROOMS]
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        consult_id = uuid.UUID(call.setup.consult_id)
        # As it stands in Redis when the node recording this consult dies:
        # the phase "on", the row "recording", both participants on that node.
        async with sqlite_harness.app[DB_ENGINE].begin() as conn:
            recording, writer = await start_recording(
                conn,
                sqlite_harness.app[FILE_STORE],
                sqlite_harness.app[MASTER_KEY].key,
                consult_id,
                now=sqlite_harness.clock.now(),
            )
        writer.write(b"media before the node died")
        writer.write_pending()
        async with rooms._store.locked(consult_id) as state:
            assert state is not None
            state.recording = RecordingPhase.ON
        await on_nodes(sqlite_harness, call.setup.consult_id, therapist="", patient="dead")

        assert await rooms.node_lost(consult_id, "dead", last_seen=sqlite_harness.clock.now()) == 1
        reconnecting = await call.therapist.expect("peer-reconnecting")
        assert reconnecting["role"] == "patient"
        off = await expect_recording(call.therapist, "off")
        assert off["reason"] == "server_restart"
        # Another node's sweep finds nothing more to do.
        assert await rooms.node_lost(consult_id, "dead", last_seen=sqlite_harness.clock.now()) == 0
        writer.abort()  # what the dead node's writer would have left behind
    row = await recording_row(sqlite_harness)
    assert row.id == recording.id
    assert (row.status, row.stop_reason) == ("incomplete", "server_restart")


async def test_a_page_that_goes_stops_the_recording_as_a_dropped_connection(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    # A reload closes the page's recorder connection and its socket together;
    # the recorder's process may be heard first (seen in CI: "the connection
    # to the recorder failed" on a reload). Here the recorder connection goes
    # a clear 0.3 s before the socket: the stop still says what happened.
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await consent_and_connect(call)
        await asyncio.sleep(0.5)
        await call.links[call.patient].close()
        await asyncio.sleep(0.3)
        await call.patient.socket.close()
        # The room hears of the socket first, then the recording stops for it.
        await call.therapist.expect("peer-reconnecting")
        off = await expect_recording(call.therapist, "off")
        assert off["reason"] == "participant_left"
    row = await finished_recording_row(sqlite_harness)
    assert (row.status, row.stop_reason) == ("complete", "participant_left")
