"""Real WebRTC peers (aiortc) with synthetic video, and a signalling client on /ws."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from typing import Any, TypeVar

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
