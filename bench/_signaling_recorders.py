"""The recordings of ``signaling_load.py --background recordings:N``, in a process of their own.

Run by bench/_signaling_background.py (never by hand) with a JSON spec as the
first line on stdin: the server's origin, the therapist's session cookie and N
consults (id, invite token). For each consult, one after the other, as two
browsers do it over /ws (docs/protocol.md): the therapist's and the
patient's sockets, ``admit``, ``record-request``, ``record-consent``, each
side's ``recorder-offer`` with its microphone and camera replaying
pre-encoded Opus and 640x480 VP8 at about 1.5 Mbit/s
(bench/_recording_sources.py: aiortc sends them without encoding), until
``recording`` ``on``. The signaling steps are the tests' own
(tests/support/recording.py, tests/support/webrtc.py).

It prints one JSON line per event on stdout (``on``: a recording started,
``all-on``, ``off``: each recording's ``off`` reason) and stops the
recordings (``record-stop``) when a line ``stop`` arrives on stdin or its
deadline passes. Its own process keeps the senders' RTP, DTLS and SRTP off
the load generator's event loop; the parent may pin it to a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import aiohttp
from _common import HOST, ROOT

sys.path.insert(0, str(ROOT))

from _recording_sources import ReplayTrack, camera_frames, voice_frames
from aiortc.mediastreams import MediaStreamTrack

from tests.support.recording import Call, consent_and_connect, expect_recording
from tests.support.webrtc import Peer, Signaller, opened


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def join(
    session: aiohttp.ClientSession,
    stack: contextlib.AsyncExitStack,
    spec: dict[str, Any],
    consult_id: str,
    invite: str,
) -> Call:
    """Both participants of a consult in, the patient admitted (as open_pairs does)."""
    origin = spec["origin"]
    port = origin.rsplit(":", 1)[1]
    therapist_socket = await session.ws_connect(
        f"ws://{HOST}:{port}/ws?consult={consult_id}",
        headers={"Origin": origin, "Cookie": spec["cookie"]},
    )
    therapist = opened(stack, Signaller(therapist_socket, opened(stack, Peer("therapist"))))
    await therapist.expect("welcome")
    async with session.post(
        f"{origin}/api/invites/{invite}/ticket", json={"consent": True}, headers={"Origin": origin}
    ) as resp:
        if resp.status != 200:
            raise RuntimeError(f"ticket: {resp.status} {await resp.text()}")
        ticket = (await resp.json())["ticket"]
    patient_socket = await session.ws_connect(
        f"ws://{HOST}:{port}/ws?ticket={ticket}", headers={"Origin": origin}
    )
    patient = opened(stack, Signaller(patient_socket, opened(stack, Peer("patient"))))
    await patient.expect("welcome")
    await therapist.expect("patient-waiting")
    await therapist.send("admit")
    await patient.expect("admitted")
    await therapist.expect("peer-joined")
    return Call(None, therapist, patient, stack)


async def record(spec: dict[str, Any]) -> int:
    deadline = time.monotonic() + float(spec["deadline_s"])
    video, audio = camera_frames(), voice_frames()
    go = asyncio.Event()
    go.set()  # each track's first frame (a keyframe) goes once its sender runs

    def tracks() -> list[MediaStreamTrack]:
        return [ReplayTrack("audio", audio, go), ReplayTrack("video", video, go)]

    calls: list[Call] = []
    async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as session:
        for index, (consult_id, invite) in enumerate(spec["consults"]):
            call = await join(session, stack, spec, consult_id, invite)
            on = await consent_and_connect(call, tracks=tracks)
            calls.append(call)
            say("on", index=index, recording=on["recording"])
        say("all-on", recordings=len(calls))
        line = ""
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(
                asyncio.to_thread(sys.stdin.readline), max(1.0, deadline - time.monotonic())
            )
        reasons: list[str] = []
        for call in calls:
            await call.therapist.send("record-stop")
            off = await expect_recording(call.therapist, "off")
            await expect_recording(call.patient, "off")
            reasons.append(str(off.get("reason")))
        say("off", reasons=reasons, asked=line.strip() == "stop")
    return 0


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    # Before any thread starts: the threads aiortc starts later inherit it.
    os.nice(int(spec.get("nice", 0)))
    return asyncio.run(asyncio.wait_for(record(spec), 900))


if __name__ == "__main__":
    sys.exit(main())
