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

With ``--pre-encoded`` the senders replay media encoded once beforehand
(bench/_recording_sources.py: 640x480 VP8 at about 1.5 Mbit/s, as a browser
sends on a good link, and 20 ms Opus frames): aiortc packs the encoded
frames into RTP without encoding them, so the senders hardly load the
machine, and the bitrate is a browser's. With ``--workers N``, N recordings
run at once, each in its own worker with two senders; each worker's CPU is
reported, and the recordings one core carries (60 / CPU-s per minute).

    .venv/bin/python bench/recording_worker.py --pre-encoded --workers 4 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import ROOT

sys.path.insert(0, str(ROOT))

from _recording_sources import ReplayTrack, camera_frames, voice_frames

from signaling.protocol import ParticipantRole
from signaling.recorder_proxy import WorkerRecorder
from signaling.recording_types import Failure
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


@dataclass(frozen=True)
class Media:
    """What the senders send: noisy cameras of a size, or pre-encoded media."""

    width: int
    height: int
    video: list[bytes] | None = None
    audio: list[bytes] | None = None


@dataclass(frozen=True)
class Measured:
    cpu_per_minute_s: float
    mbit_s: float
    idle_mib: float
    recording_mib: float
    complete: bool
    frames: dict[str, int]
    failures: list[str]
    # The lowest share, over the file's streams, of the frames the senders
    # sent while it recorded (1.0: nothing lost).
    lowest_share: float = 1.0


async def measure(seconds: float, width: int, height: int) -> str:
    one = await measure_one(seconds, Media(width, height))
    mbit_s = one.mbit_s
    return (
        f"{width}x{height} noisy cameras, {seconds:g} s: {one.cpu_per_minute_s:.2f} CPU-s per "
        f"recorded minute in the worker; {mbit_s:.1f} Mbit/s into the file "
        f"({mbit_s * 60 / 8:.0f} MB per minute); RSS {one.idle_mib:.0f} MiB idle, "
        f"{one.recording_mib:.0f} MiB recording; complete={one.complete}; frames {one.frames}; "
        f"failures {one.failures or 'none'}"
    )


def lowest_share(frames: dict[str, int], sent: dict[str, int]) -> float:
    """Frames in the file against those sent until the stop, the lowest over
    the streams (1.0 when nothing was sent: noisy cameras are not counted)."""
    shares = [frames.get(label, 0) / count for label, count in sent.items() if count]
    return min(shares, default=1.0)


async def measure_one(seconds: float, media: Media, pin: int | None = None) -> Measured:
    width, height = media.width, media.height
    failures: list[str] = []

    async def failed(failure: Failure, detail: str) -> None:
        failures.append(f"{failure.value}: {detail}")

    recorder = WorkerRecorder(on_failure=failed)
    await recorder.ready()
    pid = recorder.pid
    assert pid is not None
    if pin is not None:
        os.sched_setaffinity(pid, {pin})
    idle = rss_mib(pid)
    go = asyncio.Event()
    replays: dict[str, ReplayTrack] = {}
    if media.video is not None and media.audio is not None:
        for role in (ParticipantRole.THERAPIST, ParticipantRole.PATIENT):
            replays[f"{role.value} audio"] = ReplayTrack("audio", media.audio, go)
            replays[f"{role.value} video"] = ReplayTrack("video", media.video, go)
        links = {
            role: RecorderLink(
                tracks=[replays[f"{role.value} audio"], replays[f"{role.value} video"]]
            )
            for role in (ParticipantRole.THERAPIST, ParticipantRole.PATIENT)
        }
    else:
        go.set()
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
            go.set()
            await asyncio.sleep(WARM_UP_S)
            cpu_before, began = cpu_s(pid), time.monotonic()
            await asyncio.sleep(seconds)
            cpu_after, ended = cpu_s(pid), time.monotonic()
            recording = rss_mib(pid)
            sent = {label: replay.sent for label, replay in replays.items()}
            result = await recorder.stop()
        finally:
            await recorder.stop()
            for link in links.values():
                await link.close()
        size = await asyncio.to_thread(os.path.getsize, file.path)
    return Measured(
        cpu_per_minute_s=(cpu_after - cpu_before) / (ended - began) * 60,
        mbit_s=size * 8 / (seconds + WARM_UP_S) / 1e6,
        idle_mib=idle,
        recording_mib=recording,
        complete=result.complete,
        frames=result.frames,
        failures=failures,
        lowest_share=lowest_share(result.frames, sent),
    )


async def measure_workers(seconds: float, workers: int, pin: int | None) -> str:
    """``workers`` recordings at once, senders replaying pre-encoded media;
    with ``pin``, every worker on that one CPU and the senders on the others."""
    media = Media(640, 480, video=camera_frames(), audio=voice_frames())
    if pin is not None:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)) - {pin} or {pin})
    runs = await asyncio.gather(*(measure_one(seconds, media, pin) for _ in range(workers)))
    per_minute = [run.cpu_per_minute_s for run in runs]
    mean = statistics.mean(per_minute)
    lines = [
        f"{workers} recording(s) at once, pre-encoded 640x480 VP8 + Opus, {seconds:g} s"
        f"{f', every worker on CPU {pin}' if pin is not None else ''}; "
        f"load average before the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        *(
            f"  worker {index}: {run.cpu_per_minute_s:.2f} CPU-s per recorded minute, "
            f"{run.mbit_s:.2f} Mbit/s into the file ({run.mbit_s * 60 / 8:.1f} MB per minute), "
            f"RSS {run.recording_mib:.0f} MiB, complete={run.complete}, frames {run.frames} "
            f"(lowest share of those sent {run.lowest_share:.3f}), "
            f"failures {run.failures or 'none'}"
            for index, run in enumerate(runs)
        ),
        f"  mean {mean:.2f} CPU-s per recorded minute (max {max(per_minute):.2f}): "
        f"{60 / mean:.0f} recordings per core at this rate; lowest share of the frames sent "
        f"in any stream {min(run.lowest_share for run in runs):.3f}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--size", default="320x240", help="camera WIDTHxHEIGHT")
    parser.add_argument(
        "--pre-encoded", action="store_true", help="replay 640x480 VP8 at about 1.5 Mbit/s"
    )
    parser.add_argument("--workers", type=int, default=1, help="recordings at once (pre-encoded)")
    parser.add_argument(
        "--pin",
        type=int,
        default=None,
        help="with --pre-encoded: every worker on this CPU, the senders on the others",
    )
    args = parser.parse_args()
    if args.pin is not None and not args.pre_encoded:
        parser.error("--pin goes with --pre-encoded")
    if args.pre_encoded:
        print(asyncio.run(measure_workers(args.seconds, args.workers, args.pin)))
        return 0
    width, height = (int(part) for part in args.size.split("x"))
    print(asyncio.run(measure(args.seconds, width, height)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
