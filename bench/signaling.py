#!/usr/bin/env python3
"""Signaling load benchmark: videoconsult's /ws against the PeerJS server, on loopback.

Run from the repository root (see docs/benchmarks.md):

    .venv/bin/pip install --require-hashes --no-deps -r requirements/bench.txt
    (cd bench && npm ci)
    .venv/bin/python bench/signaling.py --pairs 500 2000 --runs 3

For every run the benchmark starts a fresh server on 127.0.0.1 (ours:
``videoconsult serve`` on a new PostgreSQL database and data directory;
PeerJS: ``node bench/peerjs_server.cjs``), opens P pairs of sockets, lets every pair do one
warm-up negotiation, then measures a fixed-duration phase in which each pair
negotiates over and over (closed loop): the first side sends an offer (~3 KB
SDP) and 8 trickle candidates (~250 B each); the other side, on the offer,
sends an answer (~3 KB) and 8 candidates; when all 18 have arrived the pair
starts its next round. Every message carries the sender's monotonic clock in
nanoseconds (ours: an ``a=x-ts:`` SDP line / an ``x-ts`` candidate extension;
PeerJS: ``payload.ts``), so the receiver measures one-way latency; sender and
receiver are both in this process, on the same clock.

``--topology`` runs ours as one node without Redis (``single``, the
default), one node on Redis (``single-redis``), or two nodes on the same
PostgreSQL and Redis with every pair's therapist on one and patient on the
other (``cross``) or both participants of a pair on one node, the pairs
split between the two (``two-nodes``).

Only addresses on 127.0.0.1 are ever contacted. Every loop is bounded by a
count or a deadline, the whole invocation by ``--max-minutes``, and every
server process it starts is killed on the way out, also on errors and Ctrl+C.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pyotp

try:
    import uvloop
except ImportError:  # pragma: no cover - requirements/bench.txt installs it
    uvloop = None

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
HOST = "127.0.0.1"  # the only address this benchmark ever talks to
VIDEOCONSULT = Path(sys.executable).parent / "videoconsult"
PEERJS_SCRIPT = BENCH / "peerjs_server.cjs"
# Our data dirs go on tmpfs where there is one: only the setup writes there.
SHM_DIR = "/dev/shm" if Path("/dev/shm").is_dir() else None  # noqa: S108 - mkdtemp inside
PASSWORD = "bench password, long enough"  # noqa: S105 - a throwaway account
EMAIL = "bench-therapist@praktijk.example"
ORG = "Bench Praktijk"


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

    def offer(self, pair: Pair, side: int, ts: int) -> str: ...
    def answer(self, pair: Pair, side: int, ts: int) -> str: ...
    def candidate(self, pair: Pair, side: int, ts: int) -> str: ...

    def decode(self, text: str) -> tuple[str, int | None]:
        """(kind, send timestamp) of a received frame; kind in offer/answer/candidate/other."""
        ...


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
# Processes: every server this benchmark starts is killed on the way out.
# --------------------------------------------------------------------------


class Processes:
    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(  # noqa: S603 - our own commands
                argv,
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, killed as one
            )
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], *, grace_s: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc in self._running:
            self._running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self._running):
            try:
                self.stop(proc, grace_s=2.0)
            except Exception as err:
                print(f"bench: could not stop pid {proc.pid}: {err}", file=sys.stderr)


PROCESSES = Processes()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def wait_http(url: str, proc: subprocess.Popen[bytes], *, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status < 500:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"server did not answer {url} within {timeout_s} s")


def proc_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def proc_rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def proc_peak_rss(pid: int) -> int:
    """VmHWM: the kernel's own high-water mark of the process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already part of user
    return total - idle, total


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
    latencies_ns: array = field(default_factory=lambda: array("q"))
    error_samples: list[str] = field(default_factory=list)
    round_timeouts: int = 0


class Pair:
    """Side 0 (therapist / first peer) offers; side 1 (patient / second peer) answers."""

    def __init__(self, index: int, sockets: list[aiohttp.ClientWebSocketResponse], ids=("", "")):
        self.index = index
        self.sockets = sockets
        self.ids = ids
        self.got = [0, 0]
        self.done: asyncio.Future[None] | None = None


class Workload:
    def __init__(self, codec: Codec, candidates: int) -> None:
        self.codec = codec
        self.candidates = candidates
        self.per_side = 1 + candidates
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

    async def round(self, pair: Pair, timeout_s: float) -> bool:
        pair.got = [0, 0]
        pair.done = asyncio.get_running_loop().create_future()
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


# --------------------------------------------------------------------------
# The servers.
# --------------------------------------------------------------------------


class Server:
    name: str
    codec: Codec
    proc: subprocess.Popen[bytes]
    origin: str
    topology = "single"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir

    @property
    def label(self) -> str:
        """The configuration's name in the tables: the server, and its topology if not one node."""
        return self.name if self.topology == "single" else f"{self.name} {self.topology}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        """Every server process (node) of this configuration."""
        return [self.proc.pid]

    async def start(self) -> None: ...

    async def prepare(self, session: aiohttp.ClientSession, n_pairs: int, concurrency: int) -> Any:
        """Whatever must exist before sockets open (ours: the consults)."""
        return None

    async def open_pairs(
        self,
        session: aiohttp.ClientSession,
        prepared: Any,
        n_pairs: int,
        concurrency: int,
        on_pair: Callable[[Pair], None],
    ) -> list[Pair]: ...

    def stop(self) -> None:
        if getattr(self, "proc", None) is not None:
            PROCESSES.stop(self.proc)

    async def cleanup(self) -> None:
        self.stop()

    def describe(self) -> dict[str, Any]:
        return {}


# Our topologies: how many nodes, whether on Redis, and on which node each
# pair's therapist and patient connect (by the pair's index).
@dataclass(frozen=True)
class Topology:
    nodes: int
    redis: bool
    place: Callable[[int], tuple[int, int]]
    about: str


TOPOLOGIES: dict[str, Topology] = {
    "single": Topology(1, False, lambda i: (0, 0), "one node, no Redis (rooms in the process)"),
    "single-redis": Topology(1, True, lambda i: (0, 0), "one node on Redis"),
    "cross": Topology(
        2, True, lambda i: (0, 1), "two nodes on Redis; every therapist on A, every patient on B"
    ),
    "two-nodes": Topology(
        2,
        True,
        lambda i: (i % 2, i % 2),
        "two nodes on Redis; both participants of a pair on the same node, pairs split half/half",
    ),
}


@dataclass
class OursNode:
    """One ``videoconsult serve`` process of a configuration."""

    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def origin(self) -> str:
        return f"http://{HOST}:{self.port}"


class OursServer(Server):
    name = "ours"
    codec = OursCodec()

    def __init__(
        self,
        log_dir: Path,
        *,
        rate_per_s: float,
        burst: int,
        source: Path | None = None,
        revision: str = "working tree",
        db: str = "postgres",
        pg: str = "",
        topology: str = "single",
        redis_url: str = "",
    ) -> None:
        super().__init__(log_dir)
        self.topology = topology
        self.layout = TOPOLOGIES[topology]
        if self.layout.nodes > 1 and db != "postgres":
            raise ValueError(f"topology {topology} needs --db postgres (the nodes share it)")
        self.db = db
        self.pg = pg
        self.pg_db = ""
        self.redis_url = redis_url if self.layout.redis else ""
        # Our own key prefix per run: every key and channel of the run starts
        # with it, and cleanup() deletes exactly those keys.
        self.redis_prefix = f"vc-bench-{secrets.token_hex(6)}" if self.redis_url else ""
        self.source = source or ROOT
        self.revision = revision
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.data_dir: Path | None = None
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIDEOCONSULT_")}
        # One master key for all nodes: a session or ticket made on one is good on the others.
        key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        env.update(
            VIDEOCONSULT_MODE="production",
            VIDEOCONSULT_SECURITY_MASTER_KEY=key,
            VIDEOCONSULT_SERVER_HOST=HOST,
            VIDEOCONSULT_LOGGING_LEVEL="warning",
            VIDEOCONSULT_SIGNALING_RATE_PER_S=str(rate_per_s),
            VIDEOCONSULT_SIGNALING_BURST=str(burst),
        )
        if self.redis_url:
            env.update(
                VIDEOCONSULT_REDIS_URL=self.redis_url,
                VIDEOCONSULT_REDIS_KEY_PREFIX=self.redis_prefix,
            )
        if source is not None:
            # A snapshot of one commit: its packages come before the editable install.
            env["PYTHONPATH"] = str(source)
        defaults = ((source or ROOT) / "config" / "defaults.toml").read_text()
        if "client_requests_per_min" in defaults:
            # Every socket of the load comes from 127.0.0.1: no per-client limit
            # (commits before it know no such setting, and refuse unknown ones).
            env["VIDEOCONSULT_SECURITY_CLIENT_REQUESTS_PER_MIN"] = "0"
        self.nodes: list[OursNode] = []
        for _ in range(self.layout.nodes):
            port = free_port()
            node_env = dict(env)
            node_env.update(
                VIDEOCONSULT_SERVER_PORT=str(port),
                VIDEOCONSULT_SERVER_PUBLIC_URL=f"http://{HOST}:{port}",
            )
            self.nodes.append(OursNode(port, node_env))
        # Accounts and consults are made through the first node.
        self.env = self.nodes[0].env
        self.port = self.nodes[0].port
        self.origin = self.nodes[0].origin
        self.cookie = ""
        self.enrol_token = ""

    @property
    def pid(self) -> int:
        proc = self.nodes[0].proc
        assert proc is not None
        return proc.pid

    @property
    def pids(self) -> list[int]:
        return [node.proc.pid for node in self.nodes if node.proc is not None]

    def _cli(self, *args: str) -> str:
        done = subprocess.run(  # noqa: S603 - our own command
            [str(VIDEOCONSULT), *args],
            env=self.env,
            cwd=self.source,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"videoconsult {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    async def start(self) -> None:
        # A fresh data dir per run, on tmpfs: only the setup writes to the
        # database (sessions, consults, connect notes), never the relay. The
        # nodes share it (and the master key), as tests/test_multinode.py does.
        base = SHM_DIR
        self.data_dir = Path(tempfile.mkdtemp(prefix="vc-bench-", dir=base))
        extra = {"VIDEOCONSULT_DATA_DIR": str(self.data_dir)}
        if self.db == "postgres":
            self.pg_db = f"vc_bench_{secrets.token_hex(6)}"
            await pg_admin(self.pg, f'CREATE DATABASE "{self.pg_db}"')
            extra["VIDEOCONSULT_DATABASE_URL"] = f"postgresql+asyncpg://{self.pg}/{self.pg_db}"
        for node in self.nodes:
            node.env.update(extra)
        await asyncio.to_thread(self._cli, "db", "upgrade")
        await asyncio.to_thread(self._cli, "org", "add", ORG)
        out = await asyncio.to_thread(
            self._cli, "user", "add", "--org", ORG, "--role", "therapist", "--email", EMAIL
        )
        found = re.search(r"/enrol/([A-Za-z0-9_-]{20,100})", out)
        if found is None:
            raise RuntimeError(f"no enrolment link in: {out!r}")
        self.enrol_token = found.group(1)
        for k, node in enumerate(self.nodes):
            log = "ours-server.log" if len(self.nodes) == 1 else f"ours-server-{'ab'[k]}.log"
            node.proc = PROCESSES.start(
                [str(VIDEOCONSULT), "serve"], env=node.env, log=self.log_dir / log
            )
        for node in self.nodes:
            assert node.proc is not None
            # /readyz: on Redis, 200 only once the node reaches it.
            await wait_http(f"{node.origin}/{'readyz' if self.redis_url else 'healthz'}", node.proc)

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                PROCESSES.stop(node.proc)
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    async def cleanup(self) -> None:
        """Stop the nodes, then drop the run's database and delete its Redis keys;
        every step runs even when one fails."""
        self.stop()
        if self.pg_db:
            name, self.pg_db = self.pg_db, ""
            try:
                await pg_admin(self.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as err:
                print(f"bench: could not drop database {name}: {err!r}", file=sys.stderr)
        if self.redis_prefix:
            prefix, self.redis_prefix = self.redis_prefix, ""
            try:
                await redis_delete_prefix(self.redis_url, prefix)
            except Exception as err:
                print(f"bench: could not delete Redis keys {prefix}:*: {err!r}", file=sys.stderr)

    def describe(self) -> dict[str, Any]:
        return {
            "code": self.revision,
            "topology": f"{self.topology}: {self.layout.about}",
            "database": (
                f"PostgreSQL, a fresh database per run at {self.pg}"
                if self.db == "postgres"
                else "SQLite (the default) in a fresh data dir on tmpfs"
            ),
            "redis": (
                f"{self.redis_url}, a key prefix of its own per run" if self.redis_url else "none"
            ),
            "mode": "production, logging.level=warning",
            "signaling.rate_per_s": self.rate_per_s,
            "signaling.burst": self.burst,
        }

    @staticmethod
    def _headers_for(node: OursNode) -> dict[str, str]:
        return {"Origin": node.origin}

    @property
    def _headers(self) -> dict[str, str]:
        return self._headers_for(self.nodes[0])

    async def _post(
        self,
        session: aiohttp.ClientSession,
        path: str,
        body: Any,
        *,
        auth: bool = False,
        node: OursNode | None = None,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        node = node or self.nodes[0]
        headers = self._headers_for(node)
        if auth:
            headers["Cookie"] = self.cookie
        async with session.post(node.origin + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None), resp

    async def prepare(self, session: aiohttp.ClientSession, n_pairs: int, concurrency: int) -> Any:
        # Enrol the therapist through the API (as tests/harness.py does), then log in once.
        token = self.enrol_token
        status, body, _ = await self._post(
            session, f"/api/enrolment/{token}/password", {"password": PASSWORD}
        )
        if status != 200:
            raise RuntimeError(f"enrolment password: {status} {body}")
        totp = pyotp.TOTP(body["totp_secret"])
        status, body, _ = await self._post(
            session, f"/api/enrolment/{token}/confirm", {"code": totp.now()}
        )
        if status != 200:
            raise RuntimeError(f"enrolment confirm: {status} {body}")
        # The confirming code is used up: log in with the next step's (drift allows it).
        login = {"email": EMAIL, "password": PASSWORD, "code": totp.at(time.time() + 30)}
        status, body, resp = await self._post(session, "/api/login", login)
        if status != 200:
            raise RuntimeError(f"login: {status} {body}")
        morsel = next(iter(resp.cookies.values()))
        self.cookie = f"{morsel.key}={morsel.value}"

        gate = asyncio.Semaphore(concurrency)

        async def create(_i: int) -> tuple[str, str]:
            async with gate:
                status, body, _ = await self._post(session, "/api/consults", {}, auth=True)
            if status != 201:
                raise RuntimeError(f"create consult: {status} {body}")
            return body["consult"]["id"], body["invite_token"]

        return await asyncio.gather(*(create(i) for i in range(n_pairs)))

    async def open_pairs(
        self,
        session: aiohttp.ClientSession,
        prepared: Any,
        n_pairs: int,
        concurrency: int,
        on_pair: Callable[[Pair], None],
    ) -> list[Pair]:
        gate = asyncio.Semaphore(concurrency)

        async def expect(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
            message = await ws.receive_json(timeout=60)
            if message.get("type") != kind:
                raise RuntimeError(f"expected {kind}, got {message}")
            return message

        async def one(index: int, consult_id: str, invite: str) -> Pair:
            therapist_at, patient_at = (self.nodes[k] for k in self.layout.place(index))
            async with gate:
                therapist = await session.ws_connect(
                    f"ws://{HOST}:{therapist_at.port}/ws?consult={consult_id}",
                    headers={**self._headers_for(therapist_at), "Cookie": self.cookie},
                )
                await expect(therapist, "welcome")
                # The ticket from the node the patient's socket goes to, as the
                # patient's page would get it through the same proxy.
                status, body, _ = await self._post(
                    session, f"/api/invites/{invite}/ticket", {"consent": True}, node=patient_at
                )
                if status != 200:
                    raise RuntimeError(f"ticket: {status} {body}")
                patient = await session.ws_connect(
                    f"ws://{HOST}:{patient_at.port}/ws?ticket={body['ticket']}",
                    headers=self._headers_for(patient_at),
                )
                await expect(patient, "welcome")
                await expect(therapist, "patient-waiting")
                await therapist.send_str('{"v":1,"type":"admit"}')
                await expect(therapist, "peer-joined")
                await expect(patient, "admitted")
            pair = Pair(index, [therapist, patient])
            on_pair(pair)  # read at once: an unread socket does not answer pings
            return pair

        return await asyncio.gather(
            *(one(i, cid, inv) for i, (cid, inv) in enumerate(prepared[:n_pairs]))
        )


class PeerJSServer(Server):
    name = "peerjs"
    codec = PeerJSCodec()

    async def start(self) -> None:
        self.port = free_port()
        self.origin = f"http://{HOST}:{self.port}"
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not installed")
        if not (BENCH / "node_modules" / "peer").is_dir():
            raise RuntimeError("the PeerJS server is not installed: run `npm ci` in bench/")
        self.proc = PROCESSES.start(
            [node, str(PEERJS_SCRIPT), str(self.port)],
            env=dict(os.environ),
            log=self.log_dir / "peerjs-server.log",
        )
        await wait_http(f"{self.origin}/", self.proc)

    def describe(self) -> dict[str, Any]:
        version = json.loads((BENCH / "node_modules/peer/package.json").read_text())["version"]
        node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)  # noqa: S607
        return {"peer": version, "node": node.stdout.strip()}

    async def open_pairs(
        self,
        session: aiohttp.ClientSession,
        prepared: Any,
        n_pairs: int,
        concurrency: int,
        on_pair: Callable[[Pair], None],
    ) -> list[Pair]:
        gate = asyncio.Semaphore(concurrency)
        tag = secrets.token_hex(3)

        async def connect(peer_id: str) -> aiohttp.ClientWebSocketResponse:
            ws = await session.ws_connect(
                f"ws://{HOST}:{self.port}/peerjs?key=peerjs&id={peer_id}"
                f"&token={secrets.token_hex(8)}"
            )
            message = await ws.receive_json(timeout=60)
            if message.get("type") != "OPEN":
                raise RuntimeError(f"expected OPEN, got {message}")
            return ws

        async def one(index: int) -> Pair:
            ids = (f"t{index}-{tag}", f"p{index}-{tag}")
            async with gate:
                first = await connect(ids[0])
                second = await connect(ids[1])
            pair = Pair(index, [first, second], ids)
            on_pair(pair)  # read at once: an unread socket does not answer pings
            return pair

        return await asyncio.gather(*(one(i) for i in range(n_pairs)))


# --------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[k])


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=120),
    )


async def close_sockets(pairs: list[Pair], readers: list[asyncio.Task[None]]) -> None:
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


def start_profiler(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on the server for ``seconds``: collapsed stacks, by function."""
    spy = shutil.which("py-spy") or str(VIDEOCONSULT.parent / "py-spy")
    argv = [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds)))]
    # --native: time in C (uvloop, system calls, pydantic-core) is shown as such.
    argv += ["--rate", "250", "--native", "--function", "--format", "raw", "-o", str(out)]
    return PROCESSES.start(argv, env=dict(os.environ), log=out.with_suffix(".log"))


async def measure_phase(
    server: Server,
    work: Workload,
    pairs: list[Pair],
    args: argparse.Namespace,
    *,
    interval_s: float,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """One measured phase on open, warmed-up pairs: closed loop (interval 0) or paced."""
    work.reset()
    pids = server.pids
    cpu_before = [proc_cpu_s(pid) for pid in pids]
    client_before = proc_cpu_s(os.getpid())
    redis_before = redis_cpu_s()
    host_before = host_cpu()
    profilers = []
    if profile_to is not None:
        for pid, out in zip(pids, profile_paths(profile_to, len(pids)), strict=True):
            profilers.append(start_profiler(pid, args.duration, out))
    elapsed = await work.drive(
        pairs,
        duration_s=args.duration,
        rounds=args.max_rounds,
        jitter_s=interval_s or 0.2,
        interval_s=interval_s,
        round_timeout_s=args.round_timeout,
    )
    host_after = host_cpu()
    cpu_after = [proc_cpu_s(pid) for pid in pids]
    client_after = proc_cpu_s(os.getpid())
    redis_after = redis_cpu_s()
    for profiler in profilers:
        try:
            await asyncio.to_thread(profiler.wait, 60)
        finally:
            PROCESSES.stop(profiler)
    stats = work.stats
    lat = sorted(stats.latencies_ns)
    node_cpu = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
    server_cpu = sum(node_cpu)
    busy = (host_after[0] - host_before[0]) / max(1, host_after[1] - host_before[1])
    extra: dict[str, Any] = {}
    if len(pids) > 1:
        # Per node; server_cpu_* above are the sum over the nodes.
        extra["node_cpu_pct"] = [round(cpu / elapsed * 100, 1) for cpu in node_cpu]
        extra["busiest_node_cpu_pct"] = max(extra["node_cpu_pct"])
    if redis_before is not None and redis_after is not None:
        # The whole Redis server: it is shared, other sessions' use is in it too.
        extra["redis_cpu_pct"] = round((redis_after - redis_before) / elapsed * 100, 1)
    return extra | {
        "elapsed_s": round(elapsed, 2),
        "sent": stats.sent,
        "relayed": stats.received,
        # Messages of a timed-out round still on their way by now count as lost.
        "lost": stats.sent - stats.received,
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "round_timeouts": stats.round_timeouts,
        "msgs_per_s": round(stats.received / elapsed, 1),
        "avg_frame_bytes": round(stats.sent_bytes / max(1, stats.sent)),
        "p50_ms": round(percentile(lat, 0.50) / 1e6, 3),
        "p99_ms": round(percentile(lat, 0.99) / 1e6, 3),
        "max_ms": round((lat[-1] if lat else 0) / 1e6, 3),
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_us_per_msg": round(server_cpu / max(1, stats.received) * 1e6, 2),
        "server_cpu_pct": round(server_cpu / elapsed * 100, 1),
        "client_cpu_pct": round((client_after - client_before) / elapsed * 100, 1),
        "host_busy_pct": round(busy * 100, 1),
        "negotiations_per_s": round(stats.received / elapsed / (2 * work.per_side), 1),
    }


async def measured_run(
    server: Server, args: argparse.Namespace, n_pairs: int, profile_to: Path | None = None
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "server": server.name,
        "topology": server.topology,
        "config": server.label,
        "pairs": n_pairs,
    }
    t0 = time.monotonic()
    readers: list[asyncio.Task[None]] = []
    try:
        await server.start()
        async with client_session() as session:
            prepared = await asyncio.wait_for(
                server.prepare(session, n_pairs, args.setup_concurrency), args.setup_timeout
            )
            work = Workload(server.codec, args.candidates)
            pairs = await asyncio.wait_for(
                server.open_pairs(
                    session, prepared, n_pairs, args.setup_concurrency, work.reading(readers)
                ),
                args.setup_timeout,
            )
            result["setup_s"] = round(time.monotonic() - t0, 1)
            # Warm-up: one negotiation per pair, not counted.
            await work.drive(
                pairs, duration_s=3600, rounds=1, jitter_s=0.5, round_timeout_s=args.round_timeout
            )
            warm = work.stats
            if warm.received != warm.sent or warm.errors:
                raise RuntimeError(
                    f"{server.name}: warm-up lost {warm.sent - warm.received} of {warm.sent} "
                    f"messages, {warm.errors} errors: {warm.error_samples}"
                )
            await asyncio.sleep(0.5)
            result["server_rss_mb_before"] = round(sum(map(proc_rss, server.pids)) / 2**20, 1)
            # Saturation: every pair negotiates again as soon as its last one completed.
            result.update(
                await measure_phase(server, work, pairs, args, interval_s=0, profile_to=profile_to)
            )
            # All nodes together: the service's memory.
            result["server_rss_mb_after"] = round(sum(map(proc_rss, server.pids)) / 2**20, 1)
            result["server_peak_rss_mb"] = round(sum(map(proc_peak_rss, server.pids)) / 2**20, 1)
            redis_clients = await redis_connected_clients()
            if redis_clients is not None and server.topology != "single":
                result["redis_clients"] = redis_clients
            if args.paced_interval > 0 and profile_to is None:
                # The same offered load for both servers: one negotiation per pair
                # every paced_interval seconds, so latency is compared at equal load.
                await asyncio.sleep(0.5)
                paced = await measure_phase(
                    server, work, pairs, args, interval_s=args.paced_interval
                )
                result.update({f"paced_{k}": v for k, v in paced.items()})
            await close_sockets(pairs, readers)
            server.stop()  # before the client closes 2P sockets one by one
    finally:
        for task in readers:
            task.cancel()
        await server.cleanup()
    result["total_s"] = round(time.monotonic() - t0, 1)
    return result


async def idle_run(
    server: Server, args: argparse.Namespace, n_conn: int, profile_to: Path | None = None
) -> dict[str, Any]:
    """Memory per idle connection: server RSS before and after opening n_conn sockets."""
    n_pairs = n_conn // 2
    t0 = time.monotonic()
    readers: list[asyncio.Task[None]] = []
    try:
        await server.start()
        async with client_session() as session:
            prepared = await asyncio.wait_for(
                server.prepare(session, n_pairs, args.setup_concurrency), args.setup_timeout
            )
            await asyncio.sleep(args.settle)
            before = proc_rss(server.pid)
            work = Workload(server.codec, args.candidates)  # readers answer pings, nothing else
            pairs = await asyncio.wait_for(
                server.open_pairs(
                    session, prepared, n_pairs, args.setup_concurrency, work.reading(readers)
                ),
                args.setup_timeout,
            )
            await asyncio.sleep(args.settle)
            after = proc_rss(server.pid)
            # What the open, silent connections cost in CPU (heartbeats, timers, checks).
            cpu_before, wall_before = proc_cpu_s(server.pid), time.monotonic()
            await asyncio.sleep(args.idle_cpu_window)
            idle_cpu_pct = (proc_cpu_s(server.pid) - cpu_before) / (time.monotonic() - wall_before)
            if profile_to is not None:
                # After the CPU reading, so the profiler's own cost is not in it.
                profiler = start_profiler(server.pid, args.idle_cpu_window, profile_to)
                try:
                    await asyncio.to_thread(profiler.wait, 60)
                finally:
                    PROCESSES.stop(profiler)
            open_now = sum(1 for p in pairs for ws in p.sockets if not ws.closed)
            if open_now < n_conn:
                print(f"bench: only {open_now} of {n_conn} sockets still open", flush=True)
            result = {
                "server": server.name,
                "connections": n_conn,
                "open_at_measurement": open_now,
                "rss_mb_before": round(before / 2**20, 1),
                "rss_mb_after": round(after / 2**20, 1),
                "kb_per_connection": round((after - before) / n_conn / 1024, 1),
                "idle_cpu_pct": round(idle_cpu_pct * 100, 1),
                "peak_rss_mb": round(proc_peak_rss(server.pid) / 2**20, 1),
                "setup_s": round(time.monotonic() - t0, 1),
            }
            await close_sockets(pairs, readers)
            server.stop()
    finally:
        for task in readers:
            task.cancel()
        await server.cleanup()
    return result


# --------------------------------------------------------------------------
# py-spy's collapsed stacks, summed up.
# --------------------------------------------------------------------------

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


# Buckets for the samples, matched from the innermost frame outwards: the
# first frame that matches decides where the sample's time goes.
CATEGORIES = [
    ("pydantic validation (parse_inbound)", ("validate_python",)),
    ("pydantic model_dump (_relay)", ("model_dump",)),
    ("json decode (stdlib json.loads)", ("json/decoder.py", "loads (json/")),
    ("json encode (stdlib json.dumps in send_json)", ("json/encoder.py", "dumps (json/")),
    ("database (SQLAlchemy/asyncpg/aiosqlite)", ("sqlalchemy/", "asyncpg/", "aiosqlite/")),
    ("logging (structlog/logging)", ("structlog/", "logging/")),
    (
        "socket writes (write/writev system calls)",
        ("_SelectorSocketTransport.write", "writev (libc", "write (libc"),
    ),
    ("socket reads (read system calls)", ("read (libc",)),
    ("cycle collector (gc)", ("gc_collect",)),
    ("aiohttp WebSocket frame writing", ("_websocket/writer", "send_frame", "send_str")),
    (
        "aiohttp reading: HTTP/WS frame parsing, receive",
        ("web_protocol.py", "_websocket/reader", "web_ws.py"),
    ),
    (
        "room store / broker in process (signaling/inprocess.py, subscribers.py)",
        ("signaling/inprocess.py", "signaling/subscribers.py"),
    ),
    # Before redis-py's own "redis/", which these paths contain too.
    ("room store / broker on Redis (signaling/redis/)", ("signaling/redis/",)),
    ("Redis client (redis-py: commands, reply parsing, pool)", ("redis/",)),
    ("rate limiter", ("signaling/ratelimit.py",)),
    (
        "rooms logic (signaling/rooms.py, protocol.py)",
        ("signaling/rooms.py", "signaling/protocol.py"),
    ),
    ("socket glue (server/signaling_ws.py)", ("server/signaling_ws.py",)),
    ("asyncio event loop, epoll, callbacks", ("asyncio/", "selectors.py")),
]


def analyse_profile(path: Path, top: int = 30) -> str:
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        if any(f.startswith("_worker (concurrent/futures/thread.py") for f in frames) and not any(
            f.startswith("run (concurrent/futures/thread.py") for f in frames
        ):
            # An idle thread-pool worker waiting for work (with --native its
            # innermost frame is the futex wait in libc), not CPU.
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        for frame in reversed(frames):
            name = next((c for c, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if name is not None:
                buckets[name] += n
                break
        else:
            buckets["other"] += n
    if not total:
        return "py-spy recorded no samples\n"
    lines = [f"py-spy samples on CPU: {total}", "", "## where the time goes (innermost match)"]
    lines += [f"{n / total * 100:5.1f}%  {c}" for c, n in buckets.most_common()]
    lines += ["", "## self time (top functions)"]
    lines += [f"{n / total * 100:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "## inclusive time (top functions)"]
    lines += [f"{n / total * 100:5.1f}%  {f}" for f, n in inclusive.most_common(top * 2)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# The whole benchmark.
# --------------------------------------------------------------------------

METRICS = [
    ("msgs_per_s", "saturated: relayed msg/s"),
    ("negotiations_per_s", "saturated: negotiations/s (18 messages each)"),
    ("p50_ms", "saturated: latency p50 (ms)"),
    ("p99_ms", "saturated: latency p99 (ms)"),
    ("lost", "saturated: lost messages"),
    ("errors", "saturated: error replies"),
    ("server_cpu_us_per_msg", "saturated: server CPU per msg (µs)"),
    ("server_cpu_pct", "saturated: server CPU (% of a core)"),
    ("busiest_node_cpu_pct", "saturated: busiest node's CPU (% of a core)"),
    ("redis_cpu_pct", "saturated: Redis server CPU (% of a core)"),
    ("client_cpu_pct", "saturated: load generator CPU (% of a core)"),
    ("host_busy_pct", "saturated: host CPU busy (% of 2 cores)"),
    ("paced_msgs_per_s", "paced: relayed msg/s"),
    ("paced_p50_ms", "paced: latency p50 (ms)"),
    ("paced_p99_ms", "paced: latency p99 (ms)"),
    ("paced_lost", "paced: lost messages"),
    ("paced_server_cpu_us_per_msg", "paced: server CPU per msg (µs)"),
    ("paced_server_cpu_pct", "paced: server CPU (% of a core)"),
    ("paced_redis_cpu_pct", "paced: Redis server CPU (% of a core)"),
    ("paced_host_busy_pct", "paced: host CPU busy (% of 2 cores)"),
    ("server_peak_rss_mb", "server peak RSS (MB, all nodes)"),
    ("redis_clients", "Redis connections after the saturated phase (all clients)"),
    ("setup_s", "setup time (s)"),
]


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def cell(runs: list[dict[str, Any]] | None, key: str) -> str:
    """The median, and the range when there were several runs."""
    values = [r[key] for r in runs or [] if key in r]
    if not values:
        return "-"
    text = number(statistics.median(values))
    if len(values) > 1 and min(values) != max(values):
        text += f" [{number(min(values))}, {number(max(values))}]"
    return text


def number(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def summary_table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run.get("config", run["server"]), run["pairs"]), []).append(run)
    pairs = sorted({p for _, p in cells})
    servers = list(dict.fromkeys(s for s, _ in cells))  # configurations, as they ran
    head = ["metric: median [min, max]"] + [f"{s} @ {p}" for p in pairs for s in servers]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in METRICS:
        row = [label]
        for p in pairs:
            for s in servers:
                row.append(cell(cells.get((s, p)), key))
        if any(c != "-" for c in row[1:]):
            out.append("| " + " | ".join(row) + " |")
    row = ["runs"]
    for p in pairs:
        for s in servers:
            row.append(str(len(cells.get((s, p), []))))
    out.append("| " + " | ".join(row) + " |")
    out += against_single(cells, pairs, servers)
    idle = results.get("idle", [])
    if idle:
        out += [
            "",
            "| idle connections | server | KB per connection | RSS before → after (MB) "
            "| server CPU while idle (% of a core) | runs |",
            "|---|---|---|---|---|---|",
        ]
        by_server: dict[str, list[dict[str, Any]]] = {}
        for r in idle:
            by_server.setdefault(r["server"], []).append(r)
        for s, rs in by_server.items():
            out.append(
                f"| {rs[0]['connections']} | {s} | {cell(rs, 'kb_per_connection')} | "
                f"{median_of(rs, 'rss_mb_before'):g} → {median_of(rs, 'rss_mb_after'):g} | "
                f"{cell(rs, 'idle_cpu_pct')} | {len(rs)} |"
            )
    return "\n".join(out) + "\n"


def against_single(
    cells: dict[tuple[str, int], list[dict[str, Any]]], pairs: list[int], configs: list[str]
) -> list[str]:
    """Our other topologies against one node without Redis: throughput ratio and
    latency added (differences of the medians), per P."""
    others = [c for c in configs if c.startswith("ours ")]
    if "ours" not in configs or not others:
        return []
    head = ["against ours (one node, no Redis), medians"] + [
        f"{c} @ {p}" for p in pairs for c in others
    ]
    rows = [
        ("msgs_per_s", "saturated throughput (x one node)", "ratio"),
        ("p50_ms", "saturated p50 added (ms)", "diff"),
        ("p99_ms", "saturated p99 added (ms)", "diff"),
        ("paced_p50_ms", "paced p50 added (ms)", "diff"),
        ("paced_p99_ms", "paced p99 added (ms)", "diff"),
        ("server_cpu_us_per_msg", "server CPU per msg, all nodes (x one node)", "ratio"),
    ]
    out = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, how in rows:
        row = [label]
        for p in pairs:
            base = median_of(cells.get(("ours", p), []), key)
            for c in others:
                value = median_of(cells.get((c, p), []), key)
                if how == "ratio":
                    row.append(f"{value / base:.2f}" if base else "-")
                else:
                    row.append(number(value - base))
        out.append("| " + " | ".join(row) + " |")
    return out


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
        "client_loop": "uvloop" if uvloop else "asyncio",
    }


def raise_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, want)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


SNAPSHOT: dict[str, Any] = {}


async def pg_admin(server: str, statement: str) -> None:
    """One statement on the PostgreSQL server's maintenance database (loopback only)."""
    import asyncpg

    user, _, hostport = server.partition("@")
    host, _, port = hostport.partition(":")
    if host not in (HOST, "localhost"):
        raise RuntimeError(f"the benchmark only uses a PostgreSQL server on {HOST}")
    conn = await asyncpg.connect(
        host=host, port=int(port or 5432), user=user, database="postgres", timeout=10
    )
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def loopback_redis(url: str) -> str:
    """``url`` if it names a Redis server on loopback; the benchmark talks to no other."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "redis" or parsed.hostname not in (HOST, "localhost"):
        raise ValueError(f"the benchmark only uses a Redis server on {HOST}, not {url!r}")
    return url


# The Redis server the benchmark's nodes use: its URL, and its process id
# when it runs on this host and can be read (for its CPU time).
REDIS_SERVER: dict[str, Any] = {}


async def find_redis(url: str) -> None:
    """Note ``url`` and its server's process; raises when Redis does not answer."""
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    REDIS_SERVER.update(url=url, version=str(info.get("redis_version", "?")), pid=None)
    pid = int(info.get("process_id", 0))
    with contextlib.suppress(psutil.Error):
        if pid and "redis" in psutil.Process(pid).name():
            psutil.Process(pid).cpu_times()  # readable?
            REDIS_SERVER["pid"] = pid


def redis_cpu_s() -> float | None:
    pid = REDIS_SERVER.get("pid")
    if pid is None:
        return None
    try:
        return proc_cpu_s(pid)
    except psutil.Error:
        return None


async def redis_connected_clients() -> int | None:
    """Connections to the Redis server now (all of its clients, not only ours)."""
    if "url" not in REDIS_SERVER:
        return None
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_SERVER["url"], socket_connect_timeout=5, socket_timeout=5)
    try:
        return int((await client.info("clients"))["connected_clients"])
    except Exception:
        return None
    finally:
        await client.aclose()


async def redis_delete_prefix(url: str, prefix: str) -> int:
    """Delete the keys ``{prefix}:*`` (one run's), never anything else; returns how many."""
    from redis.asyncio import Redis

    if not re.fullmatch(r"vc-bench-[0-9a-f]{12}", prefix):
        raise ValueError(f"not a benchmark run's key prefix: {prefix!r}")
    client = Redis.from_url(loopback_redis(url), socket_connect_timeout=5, socket_timeout=10)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await client.delete(*batch)
                batch.clear()
        if batch:
            deleted += await client.delete(*batch)
    finally:
        await client.aclose()
    return deleted


def profile_paths(base: Path, n_nodes: int) -> list[Path]:
    """Where py-spy writes each node's stacks: ``base``, or one file per node."""
    if n_nodes == 1:
        return [base]
    return [base.with_name(f"{base.stem}-node-{'ab'[k]}{base.suffix}") for k in range(n_nodes)]


def snapshot(ref: str) -> tuple[Path, str]:
    """Export commit ``ref`` (read-only ``git archive``) into a temp dir, once."""
    if "path" not in SNAPSHOT:
        git = shutil.which("git") or "git"
        commit = subprocess.run(  # noqa: S603
            [git, "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        target = Path(tempfile.mkdtemp(prefix="vc-bench-src-"))
        archive = subprocess.Popen(  # noqa: S603
            [git, "-C", str(ROOT), "archive", "--format=tar", commit], stdout=subprocess.PIPE
        )
        tar = shutil.which("tar") or "tar"
        subprocess.run([tar, "-x", "-C", str(target)], stdin=archive.stdout, check=True)  # noqa: S603
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {commit} failed")
        SNAPSHOT.update(path=target, commit=commit)
    return SNAPSHOT["path"], SNAPSHOT["commit"]


def configurations(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(server, topology) of every measured configuration, in the order of a repetition.

    PeerJS has one topology, a single process: it runs once per repetition,
    when ``single`` is among the topologies.
    """
    return [
        (name, topology)
        for topology in args.topology
        for name in args.servers
        if name == "ours" or topology == "single"
    ]


def make_server(
    name: str, args: argparse.Namespace, log_dir: Path, topology: str = "single"
) -> Server:
    if name == "ours":
        source, revision = None, "working tree"
        if args.ref:
            source, commit = snapshot(args.ref)
            revision = f"commit {commit[:12]} ({args.ref})"
        return OursServer(
            log_dir,
            rate_per_s=args.rate_per_s,
            burst=args.burst,
            source=source,
            revision=revision,
            db=args.db,
            pg=args.pg,
            topology=topology,
            redis_url=args.redis,
        )
    return PeerJSServer(log_dir)


async def main_async(args: argparse.Namespace) -> int:
    # Ctrl+C or SIGTERM cancel the whole run; the servers are stopped in main().
    # (An exception raised from a signal handler would land in whatever
    # callback the event loop runs at that moment, and may be swallowed there.)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    started = time.monotonic()
    budget_s = args.max_minutes * 60
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = RESULTS / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    fds = raise_fd_limit(4 * max(args.idle, 2 * max(args.pairs)) + 1000)
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items()},
        "fd_limit": fds,
        # The machine is shared: how busy it was around the runs.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "runs": [],
        "idle": [],
        "skipped": [],
    }
    configs = configurations(args)
    if any(TOPOLOGIES[topology].redis for _, topology in configs):
        await find_redis(args.redis)
        results["redis"] = {k: v for k, v in REDIS_SERVER.items() if k != "url"}
    described = (make_server(name, args, out_dir, topology) for name, topology in configs)
    results["servers"] = {server.label: server.describe() for server in described}

    def over_budget(what: str) -> bool:
        if time.monotonic() - started > budget_s:
            results["skipped"].append(what)
            print(f"bench: time budget spent; skipping {what}", flush=True)
            return True
        return False

    def save() -> None:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))

    # Alternate the configurations within each repetition so drift of the
    # shared machine hits all alike.
    for n_pairs in args.pairs:
        for rep in range(args.runs):
            for name, topology in configs:
                server = make_server(name, args, out_dir, topology)
                what = f"{server.label} pairs={n_pairs} run={rep + 1}"
                if over_budget(what):
                    continue
                print(f"bench: {what} ...", flush=True)
                try:
                    run = await asyncio.wait_for(
                        measured_run(server, args, n_pairs), timeout=args.run_timeout
                    )
                except Exception as err:
                    print(f"bench: {what} failed: {err!r}", flush=True)
                    traceback.print_exc()
                    results["skipped"].append(f"{what}: failed: {err!r}")
                    save()
                    continue
                run["run"] = rep + 1
                results["runs"].append(run)
                save()
                print(
                    "bench:   {msgs_per_s} msg/s, p50 {p50_ms} ms, p99 {p99_ms} ms, lost {lost}, "
                    "errors {errors}, server {server_cpu_us_per_msg} µs/msg "
                    "({server_cpu_pct}% core), client {client_cpu_pct}%, host {host_busy_pct}%, "
                    "peak RSS {server_peak_rss_mb} MB, setup {setup_s} s".format(**run)
                    + (f", nodes {run['node_cpu_pct']}%" if "node_cpu_pct" in run else "")
                    + (f", Redis {run['redis_cpu_pct']}%" if "redis_cpu_pct" in run else ""),
                    flush=True,
                )

    if args.idle:
        for rep in range(args.idle_runs):
            for name in args.servers:
                what = f"{name} idle={args.idle} run={rep + 1}"
                if over_budget(what):
                    continue
                print(f"bench: {what} ...", flush=True)
                raw = None
                if args.profile and name == "ours" and rep == 0:
                    raw = out_dir / f"profile-ours-idle-{args.idle}.txt"
                try:
                    run = await asyncio.wait_for(
                        idle_run(make_server(name, args, out_dir), args, args.idle, raw),
                        timeout=args.run_timeout,
                    )
                    if raw is not None and raw.exists():
                        report = analyse_profile(raw)
                        (out_dir / f"profile-ours-idle-{args.idle}-summary.txt").write_text(report)
                        print(report, flush=True)
                except Exception as err:
                    print(f"bench: {what} failed: {err!r}", flush=True)
                    traceback.print_exc()
                    results["skipped"].append(f"{what}: failed: {err!r}")
                    save()
                    continue
                results["idle"].append(run)
                save()
                print(
                    "bench:   {kb_per_connection} KB per connection "
                    "({rss_mb_before} -> {rss_mb_after} MB, {open_at_measurement} open)".format(
                        **run
                    ),
                    flush=True,
                )

    # One profiled run of ours per topology (every node under py-spy).
    for topology in args.topology if args.profile and "ours" in args.servers else []:
        if over_budget(f"profile {topology}"):
            break
        n_pairs = args.profile_pairs or max(args.pairs)
        tag = "ours" if topology == "single" else f"ours-{topology}"
        raw = out_dir / f"profile-{tag}-{n_pairs}.txt"
        print(f"bench: profiling {tag} at {n_pairs} pairs with py-spy ...", flush=True)
        try:
            server = make_server("ours", args, out_dir, topology)
            run = await asyncio.wait_for(
                measured_run(server, args, n_pairs, profile_to=raw), timeout=args.run_timeout
            )
            run["profiled"] = True
            results.setdefault("profile_runs", []).append(run)
            for path in profile_paths(raw, TOPOLOGIES[topology].nodes):
                if path.exists():
                    report = analyse_profile(path)
                    path.with_name(f"{path.stem}-summary.txt").write_text(report)
                    print(f"bench: {path.name}\n{report}", flush=True)
        except Exception as err:
            print(f"bench: profile {topology} failed: {err!r}", flush=True)
            traceback.print_exc()
            results["skipped"].append(f"profile {topology}: failed: {err!r}")
    results["total_minutes"] = round((time.monotonic() - started) / 60, 1)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    table = summary_table(results)
    (out_dir / "summary.md").write_text(table)
    print("\n" + table, flush=True)
    print(
        f"bench: results in {out_dir.relative_to(ROOT)} ({results['total_minutes']} min)",
        flush=True,
    )
    lost = sum(r["lost"] for r in results["runs"])
    return 1 if lost or results["skipped"] else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pairs",
        type=int,
        nargs="+",
        default=[500, 2000],
        help="concurrent consults (pairs of sockets); several values allowed",
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every configuration")
    parser.add_argument(
        "--servers", nargs="+", choices=["ours", "peerjs"], default=["ours", "peerjs"]
    )
    parser.add_argument(
        "--topology",
        nargs="+",
        choices=list(TOPOLOGIES),
        default=["single"],
        help="our nodes: "
        + "; ".join(f"{name}: {t.about}" for name, t in TOPOLOGIES.items())
        + " (PeerJS runs in single only)",
    )
    parser.add_argument(
        "--redis",
        default=f"redis://{HOST}:6379/0",
        help="the Redis server of the topologies on Redis (loopback only); every run uses "
        "a key prefix of its own and deletes its keys afterwards. The URL goes to the nodes "
        "as redis.url",
    )
    parser.add_argument(
        "--duration", type=float, default=12.0, help="seconds of the measured phase of each run"
    )
    parser.add_argument(
        "--paced-interval",
        type=float,
        default=4.0,
        help="second phase: each pair starts one negotiation every this many seconds "
        "(the same offered load on both servers; 0 skips it)",
    )
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=1000,
        help="upper bound of negotiations per pair in the measured phase",
    )
    parser.add_argument("--candidates", type=int, default=8, help="trickle candidates per side")
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=30.0,
        help="a negotiation not complete after this many seconds is lost",
    )
    parser.add_argument(
        "--idle",
        type=int,
        default=10000,
        help="idle connections for the memory measurement (0: skip)",
    )
    parser.add_argument(
        "--idle-cpu-window",
        type=float,
        default=10.0,
        help="seconds over which the idle server's CPU is read",
    )
    parser.add_argument("--idle-runs", type=int, default=3)
    parser.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds to let the server settle before reading its RSS",
    )
    parser.add_argument("--setup-concurrency", type=int, default=32)
    parser.add_argument("--setup-timeout", type=float, default=300.0)
    parser.add_argument("--run-timeout", type=float, default=480.0)
    parser.add_argument(
        "--rate-per-s",
        type=float,
        default=10000.0,
        help="our signaling.rate_per_s for the run (default 20 would throttle)",
    )
    parser.add_argument("--burst", type=int, default=100000, help="our signaling.burst")
    parser.add_argument(
        "--db",
        choices=["postgres", "sqlite"],
        default="postgres",
        help="our database: a fresh PostgreSQL database per run (as deployed), "
        "or the SQLite default in the temp data dir",
    )
    parser.add_argument(
        "--pg",
        default=f"postgres@{HOST}:5432",
        help="user@host:port of the PostgreSQL server (loopback only)",
    )
    parser.add_argument(
        "--ref",
        default="",
        help="benchmark this commit of ours (exported with git archive to a temp "
        "dir) instead of the working tree, e.g. HEAD",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one extra run of ours under py-spy (not counted in the table)",
    )
    parser.add_argument("--profile-pairs", type=int, default=0)
    parser.add_argument(
        "--max-minutes", type=float, default=19.0, help="no new run starts after this many minutes"
    )
    args = parser.parse_args(argv)
    try:
        loopback_redis(args.redis)
    except ValueError as err:
        parser.error(str(err))
    if args.db != "postgres" and any(TOPOLOGIES[t].nodes > 1 for t in args.topology):
        parser.error("two nodes share one database: --topology cross/two-nodes need --db postgres")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    try:
        if uvloop is not None:
            return uvloop.run(main_async(args))
        return asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        PROCESSES.stop_all()
        if "path" in SNAPSHOT:
            shutil.rmtree(SNAPSHOT["path"], ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
