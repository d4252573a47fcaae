"""The signaling workload's wire: the payloads, each server's spelling of them, a
pair of sockets and the rounds it negotiates."""

from __future__ import annotations

import asyncio
import json
import random
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

# --------------------------------------------------------------------------
# The payloads: a realistic offer and answer (~3 KB each) and candidates.
# --------------------------------------------------------------------------


def _sdp(role: str) -> str:
    """A Chrome-like SDP with one audio and one video section, about 3 KB."""
    setup = "actpass" if role == "offer" else "active"
    lines = [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=extmap-allow-mixed",
        "a=msid-semantic: WMS 6c0d2f1e-7a0b-4b7e-9c51-2f4c3d1b9a77",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=ice-ufrag:EsAw",
        "a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1",
        "a=ice-options:trickle",
        "a=fingerprint:sha-256 D2:FA:0E:C3:22:59:5E:14:95:69:92:3D:13:B4:84:24:"
        "2C:C2:A2:C0:3E:FD:34:8E:5E:EA:6F:AF:52:CE:E6:0F",
        f"a=setup:{setup}",
        "a=mid:0",
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
        "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=sendrecv",
        "a=msid:6c0d2f1e-7a0b-4b7e-9c51-2f4c3d1b9a77 0b6f3c4e-2d1a-4f5b-8e7c-9a1b2c3d4e5f",
        "a=rtcp-mux",
        "a=rtpmap:111 opus/48000/2",
        "a=rtcp-fb:111 transport-cc",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtpmap:63 red/48000/2",
        "a=fmtp:63 111/111",
        "a=rtpmap:9 G722/8000",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:13 CN/8000",
        "a=rtpmap:110 telephone-event/48000",
        "a=rtpmap:126 telephone-event/8000",
        "a=ssrc:1001613486 cname:Yq5l0c5xJ6c0ZbBq",
        "a=ssrc:1001613486 msid:6c0d2f1e-7a0b-4b7e-9c51-2f4c3d1b9a77 "
        "0b6f3c4e-2d1a-4f5b-8e7c-9a1b2c3d4e5f",
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 104 105 106 107 108 109 127 125 39 40 45 46",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=ice-ufrag:EsAw",
        "a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1",
        "a=ice-options:trickle",
        "a=fingerprint:sha-256 D2:FA:0E:C3:22:59:5E:14:95:69:92:3D:13:B4:84:24:"
        "2C:C2:A2:C0:3E:FD:34:8E:5E:EA:6F:AF:52:CE:E6:0F",
        f"a=setup:{setup}",
        "a=mid:1",
        "a=extmap:14 urn:ietf:params:rtp-hdrext:toffset",
        "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
        "a=extmap:13 urn:3gpp:video-orientation",
        "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
        "a=extmap:5 http://www.webrtc.org/experiments/rtp-hdrext/playout-delay",
        "a=extmap:6 http://www.webrtc.org/experiments/rtp-hdrext/video-content-type",
        "a=extmap:7 http://www.webrtc.org/experiments/rtp-hdrext/video-timing",
        "a=extmap:8 http://www.webrtc.org/experiments/rtp-hdrext/color-space",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=sendrecv",
        "a=msid:6c0d2f1e-7a0b-4b7e-9c51-2f4c3d1b9a77 5e1c2b3a-4d5e-6f70-8192-a3b4c5d6e7f8",
        "a=rtcp-mux",
        "a=rtcp-rsize",
        "a=rtpmap:96 VP8/90000",
        "a=rtcp-fb:96 goog-remb",
        "a=rtcp-fb:96 transport-cc",
        "a=rtcp-fb:96 ccm fir",
        "a=rtcp-fb:96 nack",
        "a=rtcp-fb:96 nack pli",
        "a=rtpmap:97 rtx/90000",
        "a=fmtp:97 apt=96",
        "a=rtpmap:102 H264/90000",
        "a=rtcp-fb:102 goog-remb",
        "a=rtcp-fb:102 transport-cc",
        "a=rtcp-fb:102 ccm fir",
        "a=rtcp-fb:102 nack",
        "a=rtcp-fb:102 nack pli",
        "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
        "a=rtpmap:103 rtx/90000",
        "a=fmtp:103 apt=102",
        "a=rtpmap:104 H264/90000",
        "a=rtcp-fb:104 goog-remb",
        "a=rtcp-fb:104 transport-cc",
        "a=rtcp-fb:104 nack pli",
        "a=fmtp:104 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f",
        "a=rtpmap:105 rtx/90000",
        "a=fmtp:105 apt=104",
        "a=rtpmap:106 H264/90000",
        "a=fmtp:106 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        "a=rtpmap:107 rtx/90000",
        "a=fmtp:107 apt=106",
        "a=rtpmap:108 VP9/90000",
        "a=fmtp:108 profile-id=0",
        "a=rtpmap:109 rtx/90000",
        "a=fmtp:109 apt=108",
        "a=rtpmap:127 AV1/90000",
        "a=rtpmap:125 rtx/90000",
        "a=fmtp:125 apt=127",
        "a=rtpmap:39 red/90000",
        "a=rtpmap:40 rtx/90000",
        "a=fmtp:40 apt=39",
        "a=rtpmap:45 ulpfec/90000",
        "a=ssrc-group:FID 2231627014 632943048",
        "a=ssrc:2231627014 cname:Yq5l0c5xJ6c0ZbBq",
        "a=ssrc:632943048 cname:Yq5l0c5xJ6c0ZbBq",
    ]
    return "\r\n".join(lines) + "\r\n"


OFFER_SDP = _sdp("offer")
ANSWER_SDP = _sdp("answer")
CANDIDATE_BODY = (
    "candidate:842163049 1 udp 1677729535 198.51.100.23 54321 typ srflx raddr 10.0.4.17 "
    "rport 54321 generation 0 ufrag EsAw network-id 1 network-cost 10"
)


def _json_inner(text: str) -> str:
    """``text`` escaped as the inside of a JSON string."""
    return json.dumps(text)[1:-1]


class Codec:
    """How one server's protocol spells offers, answers and candidates."""

    name: str

    def offer(self, pair: Pair, side: int, ts: int) -> str:
        raise NotImplementedError

    def answer(self, pair: Pair, side: int, ts: int) -> str:
        raise NotImplementedError

    def candidate(self, pair: Pair, side: int, ts: int) -> str:
        raise NotImplementedError

    def decode(self, text: str) -> tuple[str, int | None]:
        """(kind, send timestamp) of a received frame; kind in offer/answer/candidate/other."""
        raise NotImplementedError


class OursCodec(Codec):
    """docs/protocol.md, version 1."""

    name = "ours"

    def __init__(self) -> None:
        self._offer = '{"v":1,"type":"offer","sdp":"' + _json_inner(OFFER_SDP) + "a=x-ts:"
        self._answer = '{"v":1,"type":"answer","sdp":"' + _json_inner(ANSWER_SDP) + "a=x-ts:"
        self._sdp_end = '\\r\\n"}'
        self._cand = '{"v":1,"type":"candidate","candidate":"' + CANDIDATE_BODY + " x-ts "
        self._cand_end = '","sdpMid":"0","sdpMLineIndex":0}'

    def offer(self, pair: Pair, side: int, ts: int) -> str:
        return f"{self._offer}{ts}{self._sdp_end}"

    def answer(self, pair: Pair, side: int, ts: int) -> str:
        return f"{self._answer}{ts}{self._sdp_end}"

    def candidate(self, pair: Pair, side: int, ts: int) -> str:
        return f"{self._cand}{ts}{self._cand_end}"

    def decode(self, text: str) -> tuple[str, int | None]:
        message = orjson.loads(text)
        kind = message.get("type")
        if kind == "candidate":
            return kind, int(message["candidate"].rpartition(" ")[2])
        if kind in ("offer", "answer"):
            sdp = message["sdp"]
            at = sdp.rfind("a=x-ts:")
            return kind, int(sdp[at + 7 : sdp.index("\r", at)])
        if kind == "error":
            return "error", None
        return "other", None


class PeerJSCodec(Codec):
    """The PeerJS client's messages (peerjs 1.x: OFFER/ANSWER/CANDIDATE with dst)."""

    name = "peerjs"

    def __init__(self) -> None:
        self._offer_sdp = _json_inner(OFFER_SDP)
        self._answer_sdp = _json_inner(ANSWER_SDP)

    def offer(self, pair: Pair, side: int, ts: int) -> str:
        return (
            f'{{"type":"OFFER","dst":"{pair.ids[1 - side]}","payload":{{"sdp":{{"type":"offer",'
            f'"sdp":"{self._offer_sdp}"}},"type":"media","connectionId":"mc_{pair.index}",'
            f'"metadata":null,"ts":{ts}}}}}'
        )

    def answer(self, pair: Pair, side: int, ts: int) -> str:
        return (
            f'{{"type":"ANSWER","dst":"{pair.ids[1 - side]}","payload":{{"sdp":{{"type":"answer",'
            f'"sdp":"{self._answer_sdp}"}},"type":"media","connectionId":"mc_{pair.index}",'
            f'"ts":{ts}}}}}'
        )

    def candidate(self, pair: Pair, side: int, ts: int) -> str:
        return (
            f'{{"type":"CANDIDATE","dst":"{pair.ids[1 - side]}","payload":{{"candidate":'
            f'{{"candidate":"{CANDIDATE_BODY}","sdpMid":"0","sdpMLineIndex":0}},'
            f'"type":"media","connectionId":"mc_{pair.index}","ts":{ts}}}}}'
        )

    def decode(self, text: str) -> tuple[str, int | None]:
        message = orjson.loads(text)
        kind = message.get("type")
        if kind in ("OFFER", "ANSWER", "CANDIDATE"):
            return kind.lower(), int(message["payload"]["ts"])
        if kind in ("ERROR", "EXPIRE", "LEAVE", "ID-TAKEN"):
            return "error", None
        return "other", None


# --------------------------------------------------------------------------
# One pair: two sockets and the rounds they negotiate.
# --------------------------------------------------------------------------


@dataclass
class Stats:
    sent: int = 0
    received: int = 0
    errors: int = 0
    other: int = 0
    sent_bytes: int = 0
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    error_samples: list[str] = field(default_factory=list)
    round_timeouts: int = 0


class Pair:
    """Side 0 (therapist / first peer) offers; side 1 (patient / second peer) answers."""

    def __init__(
        self,
        index: int,
        sockets: list[aiohttp.ClientWebSocketResponse],
        ids: tuple[str, str] = ("", ""),
    ) -> None:
        self.index = index
        self.sockets = sockets
        self.ids = ids
        self.got = [0, 0]
        self.done: asyncio.Future[None] | None = None


class Workload:
    """A negotiation is 1 + ``candidates`` messages each way. ``shape``:
    ``burst``, each side sends its SDP and its candidates at once (the offerer
    first, the answerer on the offer); ``pingpong``, one message in flight per
    pair: offer, answer, then candidates in turn, each sent when the last
    arrived (a single consult's negotiation, one round trip at a time)."""

    def __init__(self, codec: Codec, candidates: int, shape: str = "burst") -> None:
        if shape not in ("burst", "pingpong"):
            raise ValueError(f"unknown workload shape {shape!r}")
        self.codec = codec
        self.candidates = candidates
        self.per_side = 1 + candidates
        self.pingpong = shape == "pingpong"
        self.stats = Stats()
        self.measuring = False

    def reset(self) -> None:
        self.stats = Stats()

    def reading(self, readers: list[asyncio.Task[None]]) -> Callable[[Pair], None]:
        """A callback that starts reading both sockets of a pair as soon as it is open."""

        def start(pair: Pair) -> None:
            readers.extend(asyncio.create_task(self.reader(pair, side)) for side in (0, 1))

        return start

    async def _send(self, pair: Pair, side: int, make: Callable[[Pair, int, int], str]) -> None:
        text = make(pair, side, time.monotonic_ns())
        self.stats.sent += 1
        self.stats.sent_bytes += len(text)
        await pair.sockets[side].send_str(text)

    async def _send_burst(
        self, pair: Pair, side: int, sdp: Callable[[Pair, int, int], str]
    ) -> None:
        await self._send(pair, side, sdp)
        for _ in range(self.candidates):
            await self._send(pair, side, self.codec.candidate)

    async def reader(self, pair: Pair, side: int) -> None:
        """Read one socket until it closes (bounded by the socket's life)."""
        ws = pair.sockets[side]
        decode = self.codec.decode
        async for frame in ws:
            if frame.type is not aiohttp.WSMsgType.TEXT:
                continue
            now = time.monotonic_ns()
            kind, ts = decode(frame.data)
            stats = self.stats
            if ts is None:
                if kind == "error":
                    stats.errors += 1
                    if len(stats.error_samples) < 5:
                        stats.error_samples.append(frame.data[:300])
                else:
                    stats.other += 1
                continue
            stats.received += 1
            stats.latencies_ns.append(now - ts)
            if self.pingpong:
                await self._next_in_turn(pair, side)
                continue
            if kind == "offer" and side == 1:
                await self._send_burst(pair, 1, self.codec.answer)
            pair.got[side] += 1
            if (
                pair.got[0] >= self.per_side
                and pair.got[1] >= self.per_side
                and pair.done is not None
                and not pair.done.done()
            ):
                pair.done.set_result(None)

    async def _next_in_turn(self, pair: Pair, side: int) -> None:
        """Ping-pong: the side that just received sends the next message."""
        pair.got[side] += 1
        step = pair.got[0] + pair.got[1]
        if step < 2 * self.per_side:
            await self._send(pair, side, self.codec.answer if step == 1 else self.codec.candidate)
        elif pair.done is not None and not pair.done.done():
            pair.done.set_result(None)

    async def round(self, pair: Pair, timeout_s: float) -> bool:
        pair.got = [0, 0]
        pair.done = asyncio.get_running_loop().create_future()
        if self.pingpong:
            await self._send(pair, 0, self.codec.offer)
        else:
            await self._send_burst(pair, 0, self.codec.offer)
        try:
            await asyncio.wait_for(pair.done, timeout_s)
        except TimeoutError:
            self.stats.round_timeouts += 1
            return False
        return True

    async def drive(
        self,
        pairs: list[Pair],
        *,
        duration_s: float,
        rounds: int,
        jitter_s: float,
        round_timeout_s: float,
        interval_s: float = 0.0,
    ) -> float:
        """Every pair negotiates until the deadline (or ``rounds``): in a closed loop
        (the next negotiation as soon as the last one completed), or, with
        ``interval_s``, starting one every ``interval_s`` seconds (paced)."""
        deadline = time.monotonic() + duration_s

        async def one(pair: Pair) -> None:
            start = time.monotonic() + random.uniform(0, jitter_s)
            for k in range(rounds):
                due = start + k * interval_s
                if max(due, time.monotonic()) >= deadline:
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not await self.round(pair, round_timeout_s):
                    return

        started = time.monotonic()
        await asyncio.wait_for(
            asyncio.gather(*(one(p) for p in pairs)),
            timeout=duration_s + jitter_s + round_timeout_s + 30,
        )
        return time.monotonic() - started
