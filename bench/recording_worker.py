#!/usr/bin/env python3
"""A recorder worker's cost: CPU per recorded minute and memory, over real WebRTC.

Run from the repository root (docs/recording.md, "The worker process"):

    .venv/bin/python bench/recording_worker.py --seconds 30 --size 320x240

One recording as the server makes it: a ``WorkerRecorder`` starts a worker
process, two aiortc peers (this process) connect to it and send their
microphones and noisy cameras (aiortc's VP8 encoder, at whatever bitrate the
noise costs it: several Mbit/s, more than a browser's 1.5), the worker
receives them (ICE, DTLS, SRTP, jitter buffer), copies the frames into the
file and encrypts it. Counted: the worker process's CPU time (user + system,
every thread, from /proc) over ``--seconds`` after a 3 s warm-up, its
resident memory idle and while recording, and the file's bytes per minute.
The senders' encoding runs in this process and is not counted. A rough
figure, not bench/recording.py's controlled one: the bitrate follows the
encoder.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT

sys.path.insert(0, str(ROOT))

from signaling.protocol import ParticipantRole
from signaling.recorder import Failure
from signaling.recorder_proxy import WorkerRecorder
from tests.support.recording import RecorderLink, new_recording_file

WARM_UP_S = 3.0


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def measure(seconds: float, width: int, height: int) -> str:
    failures: list[str] = []

    async def failed(failure: Failure, detail: str) -> None:
        failures.append(f"{failure.value}: {detail}")

    recorder = WorkerRecorder(on_failure=failed)
    await recorder.ready()
    pid = recorder.pid
    assert pid is not None
    idle = rss_mib(pid)
    links = {
        role: RecorderLink(video=(width, height), noisy=True)
        for role in (ParticipantRole.THERAPIST, ParticipantRole.PATIENT)
    }
    with tempfile.TemporaryDirectory(prefix="vc-bench-worker-") as directory:
        try:
            for role, link in links.items():
                await link.accept(await recorder.accept_offer(role, await link.offer()))
            await recorder.wait_connected(frozenset(links))
            file = new_recording_file(Path(directory))
            await recorder.start(file)
            await asyncio.sleep(WARM_UP_S)
            cpu_before, began = cpu_s(pid), time.monotonic()
            await asyncio.sleep(seconds)
            cpu_after, ended = cpu_s(pid), time.monotonic()
            recording = rss_mib(pid)
            result = await recorder.stop()
        finally:
            await recorder.stop()
            for link in links.values():
                await link.close()
        size = await asyncio.to_thread(os.path.getsize, file.path)
    per_minute = (cpu_after - cpu_before) / (ended - began) * 60
    mbit_s = size * 8 / (seconds + WARM_UP_S) / 1e6
    return (
        f"{width}x{height} noisy cameras, {seconds:g} s: {per_minute:.2f} CPU-s per recorded "
        f"minute in the worker; {mbit_s:.1f} Mbit/s into the file "
        f"({mbit_s * 60 / 8:.0f} MB per minute); RSS {idle:.0f} MiB idle, "
        f"{recording:.0f} MiB recording; complete={result.complete}; frames {result.frames}; "
        f"failures {failures or 'none'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--size", default="320x240", help="camera WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(part) for part in args.size.split("x"))
    print(asyncio.run(measure(args.seconds, width, height)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
