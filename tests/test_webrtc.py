"""Real WebRTC peers through our signaling: media flows, and flows again after a reconnect.

Two aiortc peer connections in the test process play the therapist's and the
patient's browser. Each talks to the real server through its own ``/ws``
socket; the server only relays offer, answer and candidates. aiortc does not
trickle: ``setLocalDescription`` waits for ICE gathering to complete, so the
offer and the answer carry every candidate. Relayed ``candidate`` messages are
still applied when they come, as a browser peer would send them.

On this machine aioice does not gather 127.0.0.1, so the two peers meet over
the host's other interface. ``RTCConfiguration(iceServers=[])`` is always
passed: without it aiortc asks a public STUN server, and there is no internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from typing import Any, TypeVar

import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack
from aiortc.sdp import candidate_from_sdp
from av import VideoFrame

from tests.harness import Harness, Sockets, new_consult, receive
from tests.test_signaling import consult_row

# Each harness test runs on the in-process broker and on the real Redis.
pytestmark = pytest.mark.signaling_backends

PeerOrSignaller = TypeVar("PeerOrSignaller", "Peer", "Signaller")

# Frames of each kind each side must receive, and how long that may take.
ENOUGH_FRAMES = 10
MEDIA_TIMEOUT_S = 20.0
SIGNAL_TIMEOUT_S = 10.0


class SyntheticVideo(VideoStreamTrack):
    """Small frames whose brightness changes, with the base class's 30 fps timestamps."""

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(width=160, height=120)
        luma = (pts // 3000) % 256
        for index, plane in enumerate(frame.planes):
            plane.update(bytes([luma if index == 0 else 128]) * plane.buffer_size)
        frame.pts = pts
        frame.time_base = time_base
        return frame


class Peer:
    """One side's RTCPeerConnection: sends synthetic audio and video, counts what it receives."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.frames: Counter[str] = Counter()
        self.frame_received = asyncio.Condition()
        self._local: list[MediaStreamTrack] = [AudioStreamTrack(), SyntheticVideo()]
        self._readers: list[asyncio.Task[None]] = []
        for track in self._local:
            self.pc.addTrack(track)
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._readers.append(asyncio.create_task(self._read(track)))

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                async with self.frame_received:
                    self.frames[track.kind] += 1
                    self.frame_received.notify_all()

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def answer(self, offer_sdp: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return str(self.pc.localDescription.sdp)

    async def accept_answer(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))

    async def add_candidate(self, message: dict[str, Any]) -> None:
        text: str = message["candidate"]
        if not text:
            return  # end of candidates: aiortc needs no word of it
        candidate = candidate_from_sdp(text.removeprefix("candidate:"))
        candidate.sdpMid = message.get("sdpMid")
        candidate.sdpMLineIndex = message.get("sdpMLineIndex")
        await self.pc.addIceCandidate(candidate)

    def has_media(self, at_least: int) -> bool:
        return self.frames["audio"] >= at_least and self.frames["video"] >= at_least

    def describe(self) -> str:
        return (
            f"{self.name}: received {dict(self.frames)}, ICE {self.pc.iceConnectionState}, "
            f"connection {self.pc.connectionState}"
        )

    async def close(self) -> None:
        await self.pc.close()
        for track in self._local:
            track.stop()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


class Signaller:
    """One side's signaling socket, pumped in the background like a browser's onmessage.

    Relayed offers, answers and candidates go straight to the current
    :class:`Peer` (an offer is answered at once); every other message waits in
    a queue for the test to :meth:`expect` it.
    """

    def __init__(self, socket: ClientWebSocketResponse, peer: Peer) -> None:
        self.socket = socket
        self.peer = peer
        self._inbox: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._pump = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.socket.receive()
                if frame.type is not WSMsgType.TEXT:
                    return
                message: dict[str, Any] = frame.json()
                kind = message["type"]
                if kind == "offer":
                    sdp = await self.peer.answer(message["sdp"])
                    await self.send("answer", sdp=sdp)
                elif kind == "answer":
                    await self.peer.accept_answer(message["sdp"])
                elif kind == "candidate":
                    await self.peer.add_candidate(message)
                else:
                    self._inbox.put_nowait(message)
        except Exception as err:
            self._inbox.put_nowait(err)

    async def send(self, kind: str, **fields: Any) -> None:
        await self.socket.send_json({"v": 1, "type": kind, **fields})

    async def expect(self, kind: str) -> dict[str, Any]:
        """The next non-relayed message, which must be of ``kind``."""
        item = await asyncio.wait_for(self._inbox.get(), SIGNAL_TIMEOUT_S)
        if isinstance(item, BaseException):
            raise AssertionError(f"the signaling pump failed waiting for {kind}") from item
        assert item["type"] == kind, item
        return item

    def assert_nothing_unexpected(self) -> None:
        """No error (nor anything else) arrived that the test did not expect."""
        assert self._inbox.empty(), self._inbox.get_nowait()

    async def close(self) -> None:
        await self.socket.close()
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump


async def all_receive_media(*peers: Peer, at_least: int = ENOUGH_FRAMES) -> None:
    """Until every peer has received ``at_least`` audio and ``at_least`` video frames."""
    try:
        async with asyncio.timeout(MEDIA_TIMEOUT_S):
            for peer in peers:
                async with peer.frame_received:
                    await peer.frame_received.wait_for(functools.partial(peer.has_media, at_least))
    except TimeoutError:
        states = "; ".join(peer.describe() for peer in peers)
        raise AssertionError(f"no media after {MEDIA_TIMEOUT_S} s: {states}") from None


def opened(stack: contextlib.AsyncExitStack, item: PeerOrSignaller) -> PeerOrSignaller:
    """``item``, closed when the test ends however it ends (closing twice is harmless)."""
    stack.push_async_callback(item.close)
    return item


async def test_therapist_and_patient_exchange_media_through_our_signaling(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness, display_name="Mevr. J.")
    therapist_socket = await sockets.therapist(setup.consult_id)
    await receive(therapist_socket, "welcome")
    patient_socket = await sockets.patient(setup.invite_token)
    assert (await receive(patient_socket, "welcome"))["state"] == "waiting"
    await receive(therapist_socket, "patient-waiting")

    async with contextlib.AsyncExitStack() as stack:
        therapist = opened(stack, Peer("therapist"))
        patient = opened(stack, Peer("patient"))
        therapist_signals = opened(stack, Signaller(therapist_socket, therapist))
        patient_signals = opened(stack, Signaller(patient_socket, patient))

        await therapist_signals.send("admit")
        await patient_signals.expect("admitted")
        assert (await therapist_signals.expect("peer-joined"))["role"] == "patient"
        # The therapist's client always makes the offer; the patient's pump answers it.
        await therapist_signals.send("offer", sdp=await therapist.offer())

        await all_receive_media(therapist, patient)
        assert therapist.pc.connectionState == "connected"
        assert patient.pc.connectionState == "connected"
        therapist_signals.assert_nothing_unexpected()
        patient_signals.assert_nothing_unexpected()


async def test_after_the_patient_reconnects_an_ice_restart_brings_media_back(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness)
    therapist_socket = await sockets.therapist(setup.consult_id)
    await receive(therapist_socket, "welcome")
    patient_socket = await sockets.patient(setup.invite_token)
    await receive(patient_socket, "welcome")
    await receive(therapist_socket, "patient-waiting")

    async with contextlib.AsyncExitStack() as stack:
        therapist = opened(stack, Peer("therapist"))
        patient = opened(stack, Peer("patient"))
        therapist_signals = opened(stack, Signaller(therapist_socket, therapist))
        patient_signals = opened(stack, Signaller(patient_socket, patient))
        await therapist_signals.send("admit")
        await patient_signals.expect("admitted")
        await therapist_signals.expect("peer-joined")
        await therapist_signals.send("offer", sdp=await therapist.offer())
        await all_receive_media(therapist, patient)
        started_at = (await consult_row(harness, setup.consult_id)).started_at
        assert started_at is not None

        # The patient's page reloads: its socket and its peer connection are gone.
        await patient_signals.close()
        await patient.close()
        reconnecting = await therapist_signals.expect("peer-reconnecting")
        assert reconnecting["role"] == "patient"
        harness.clock.advance(10)  # well within the grace period

        patient_again = opened(stack, Peer("patient, reconnected"))
        reconnected_socket = await sockets.patient(setup.invite_token)
        patient_signals_again = opened(stack, Signaller(reconnected_socket, patient_again))
        welcome = await patient_signals_again.expect("welcome")
        assert welcome["state"] == "active"
        assert welcome["peer_present"] is True
        assert (await therapist_signals.expect("peer-rejoined"))["role"] == "patient"

        # The therapist restarts ICE with a new offer. aiortc's restartIce support
        # is limited, so the therapist's client offers from a new peer connection
        # (what a reloaded browser does too); the old one is closed. Counting on
        # the new peer connections counts only frames received after the reconnect.
        therapist_again = opened(stack, Peer("therapist, after the rejoin"))
        therapist_signals.peer = therapist_again
        await therapist.close()
        await therapist_signals.send("offer", sdp=await therapist_again.offer())

        await all_receive_media(therapist_again, patient_again)
        assert therapist_again.pc.connectionState == "connected"
        assert patient_again.pc.connectionState == "connected"
        assert (await consult_row(harness, setup.consult_id)).started_at == started_at
        therapist_signals.assert_nothing_unexpected()
        patient_signals_again.assert_nothing_unexpected()
