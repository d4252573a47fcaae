#!/usr/bin/env python3
"""Recording benchmark: CPU per minute of a recorded consult, consults one core records, store MB/s.

Run from the repository root (see docs/benchmarks.md, "Recording"):

    .venv/bin/python bench/recording.py --runs 3

A *consult* here is the server's recording path without the network: four
sources at real-time pace (therapist microphone and camera, patient
microphone and camera) hand their *encoded* frames to a
``signaling.recorder.ConsultRecorder`` (``add_source``) the way the taps on
its aiortc receivers do after the jitter buffer, and ``start`` does the rest
as in the server: the pass-through muxer (WebM, PyAV, no codecs) writing
into an ``audit.filestore.EncryptingWriter`` over a real file created by
``audit.recordings.FileStore`` in a new temp directory (removed afterwards),
its watchdog flushing pending ciphertext every second. What the network
adds in the server (ICE, SRTP, RTP and the jitter buffer, depayloading) is
not measured.

The sources (bench/_recording_sources.py): a camera of 640x480 at 30 fps as
VP8 at about 1.5 Mbit/s (FFmpeg's ``testsrc2`` with temporal noise, encoded
once before any measurement) and a voice-like sound as 20 ms Opus frames.

Per run, each measurement in a fresh child process (its CPU time is the
consult's alone; ``time.process_time`` counts every thread, aiortc's too):

- *generate*: one consult's sources handing their frames to nothing for
  ``--seconds``, no recording: the cost of the sources;
- *record*: one consult recorded for ``--seconds``: the recorder's CPU per
  minute is (record - generate) CPU per second x 60; the file size per
  minute; the frames in the decrypted file, counted by decoding it;
- *PyAV alone*: the same encoded frames (both cameras, both microphones,
  as many as ``--seconds`` of a consult) muxed by PyAV alone into WebM in
  memory, as fast as it goes, no aiortc, asyncio or encryption;
- *capacity*: the child pinned to one core (``--cpu``), N consults at once
  for ``--capacity-seconds``, N = 1, 2, ... until one fails or
  ``--max-consults``. A run passes when every stream of every file holds at
  least 95 % of the frames a real-time source produces in the time (video
  30/s, Opus 50/s), no source is more than 0.5 s behind its
  schedule at the stop, and no recorder reported a failure;
- *store*: ``EncryptingWriter`` writing ``--store-mib`` MiB in 64 KiB writes
  (its default chunk size: 64 KiB) to a null sink (AES-GCM and framing
  only), to a real file (page cache, as the store writes; and once more with
  an ``fsync`` at the end), ``decrypt_chunks`` reading the file back, and
  ``AESGCM.encrypt`` alone over the same chunks as the reference.

Every loop is bounded by a count or a deadline, every child by a time-out,
the invocation by ``--max-minutes``. Results go to
``bench/results/<timestamp>-recording/`` (``results.json``, ``summary.md``).
Exit status 1 when a measurement could not run or was skipped, or the
one-consult recording lost frames; a capacity step that fails is a result.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, cast

import av
from _common import (
    ROOT,
    Invocation,
    cpu_jiffies,
    loadavg,
    run_loop,
)
from _recording_report import consult_figures, judge, machine, summary_table
from _recording_sources import (
    AUDIO_RATE,
    AUDIO_SAMPLES,
    FPS,
    EncodedSource,
    camera_frames,
    consult_sources,
    voice_frames,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from audit.filestore import (
    DEFAULT_CHUNK_SIZE,
    EncryptingWriter,
    decrypt_chunks,
    new_data_key,
)
from audit.recordings import FileStore, RecordingFile
from signaling.media_codecs import WEBM
from signaling.muxer import CONTAINER_OPTIONS
from signaling.protocol import ParticipantRole
from signaling.recorded_track import ReceivedTrack, StreamKind
from signaling.recorder import ConsultRecorder
from signaling.recording_types import Failure

# --------------------------------------------------------------------------
# The measurements (each runs in a child process).
# --------------------------------------------------------------------------


class Meter:
    """Wall time, this process's CPU (all threads) and the core's (or host's) busy share."""

    def __init__(self, cpu: int | None) -> None:
        self._cpu = cpu

    def __enter__(self) -> Meter:
        self._jiffies = cpu_jiffies(self._cpu)
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self.wall0
        self.cpu_s = time.process_time() - self.cpu0
        busy1, total1 = cpu_jiffies(self._cpu)
        self.busy_pct = 100 * (busy1 - self._jiffies[0]) / max(1, total1 - self._jiffies[1])

    def figures(self) -> dict[str, float]:
        return {
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "cpu_pct_of_core": round(100 * self.cpu_s / self.wall_s, 1),
            "busy_pct": round(self.busy_pct, 1),
        }


class NoFeedback:
    """Where the benchmark's keyframe requests go: nowhere (its sources start
    with a keyframe and send one every 6 s)."""

    async def _send_rtcp_pli(self, media_ssrc: int) -> None:
        return None


async def generate(params: dict[str, Any]) -> dict[str, Any]:
    """The sources of ``consults`` consults handing frames to nothing: their cost."""
    video, audio = camera_frames(), voice_frames()
    sources = [
        t
        for _ in range(params["consults"])
        for ts in consult_sources(video, audio).values()
        for t in ts
    ]

    def nowhere(item: Any) -> None:
        return None

    with Meter(params.get("cpu")) as meter:
        senders = [asyncio.create_task(t.run(nowhere)) for t in sources]
        await asyncio.sleep(params["seconds"])
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
    return {**meter.figures(), "sources": [t.pace.figures() for t in sources]}


@dataclass
class BenchConsult:
    """One consult's recording into a real encrypted file."""

    store: FileStore
    video: list[bytes]
    audio: list[bytes]

    def __post_init__(self) -> None:
        self.file_id = uuid.uuid4()
        self.file_name = f"{self.file_id}.vcenc"
        self.key = new_data_key()
        self.sources = consult_sources(self.video, self.audio)
        self.failures: list[str] = []
        self.recorder = ConsultRecorder(on_failure=self._failed)
        self.taps = []
        for role, sources in self.sources.items():
            for source in sources:
                track = ReceivedTrack(
                    role=role,
                    kind=StreamKind(source.kind),
                    codec=source.codec,
                    receiver=NoFeedback(),
                    clock_rate=90000 if source.kind == "video" else AUDIO_RATE,
                    awaiting_keyframe=source.kind == "video",
                )
                # What a receiver's tap would be handed, after the jitter buffer.
                self.taps.append((source, self.recorder.add_source(track)))
        self.senders: list[asyncio.Task[None]] = []

    async def _failed(self, failure: Failure, detail: str) -> None:
        self.failures.append(f"{failure.value}: {detail}")

    async def start(self) -> None:
        # As audit.recordings.begin_recording makes it: created empty, then
        # opened by the recorder.
        self.store.create(self.file_name).close()
        file = RecordingFile(str(self.store.path(self.file_name)), self.file_id, self.key)
        self.started = time.monotonic()
        await self.recorder.start(file)
        self.senders = [asyncio.create_task(source.run(tap.put)) for source, tap in self.taps]

    async def stop(self) -> dict[str, Any]:
        self.elapsed_s = time.monotonic() - self.started
        for sender in self.senders:
            sender.cancel()
        await asyncio.gather(*self.senders, return_exceptions=True)
        result = await self.recorder.stop()
        return {"complete": result.complete, "handed_to_recorder": result.frames}

    def sources_in_file_order(self) -> list[tuple[str, EncodedSource]]:
        """(label, source) in the order of the file's streams."""
        return [
            (f"{role.value} {kind}", t)
            for role in (ParticipantRole.THERAPIST, ParticipantRole.PATIENT)
            for kind in ("audio", "video")
            for t in self.sources[role]
            if t.kind == kind
        ]


def count_frames(media: bytes) -> list[dict[str, Any]]:
    """Decode every stream of the file (here, to check it: the recorder decodes
    nothing); frames per stream."""
    out = []
    with av.open(io.BytesIO(media), mode="r") as container:
        frames = {s.index: 0 for s in container.streams}
        for packet in container.demux():
            if packet.size:
                frames[packet.stream.index] += len(packet.decode())
        for stream in container.streams:
            out.append({"kind": stream.type, "frames": frames[stream.index]})
    return out


async def record(params: dict[str, Any]) -> dict[str, Any]:
    """``consults`` consults recorded at once for ``seconds``; then their files checked."""
    video, audio = camera_frames(), voice_frames()
    directory = Path(tempfile.mkdtemp(prefix="vc-bench-recording-"))
    try:
        store = FileStore(directory / "recordings")
        consults = [BenchConsult(store, video, audio) for _ in range(params["consults"])]
        with Meter(params.get("cpu")) as meter:
            for consult in consults:
                await consult.start()
            await asyncio.sleep(params["seconds"])
            stops = [await consult.stop() for consult in consults]
        # Outside the measurement: decrypt and decode, on every core again.
        os.sched_setaffinity(0, os.sched_getaffinity(os.getppid()))
        files = []
        for consult, stop in zip(consults, stops, strict=True):
            path = store.path(consult.file_name)
            with store.open(consult.file_name) as source:
                media = b"".join(decrypt_chunks(source, consult.key, file_id=consult.file_id))
            streams = count_frames(media)
            for stream, (label, source_track) in zip(
                streams, consult.sources_in_file_order(), strict=True
            ):
                stream["label"] = label
                rate = FPS if stream["kind"] == "video" else AUDIO_RATE / AUDIO_SAMPLES
                stream["expected"] = round(consult.elapsed_s * rate, 1)
                stream["share"] = round(stream["frames"] / stream["expected"], 4)
                stream.update(source_track.pace.figures())
            files.append(
                {
                    **stop,
                    "elapsed_s": round(consult.elapsed_s, 3),
                    "file_bytes": path.stat().st_size,
                    "plaintext_bytes": len(media),
                    "streams": streams,
                    "failures": consult.failures,
                }
            )
        return {**meter.figures(), "files": files}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def pyav_alone(params: dict[str, Any]) -> dict[str, Any]:
    """The same encoded frames muxed by PyAV alone, as fast as it goes, into memory."""
    video, audio = camera_frames(), voice_frames()
    video_frames = round(params["seconds"] * FPS)
    audio_per_video = AUDIO_RATE / AUDIO_SAMPLES / FPS  # 50 / 30

    def frames() -> list[tuple[int, int, bytes]]:
        """(stream, pts, frame) in time order: cameras at 30/s, microphones at 50/s."""
        out: list[tuple[int, int, bytes]] = []
        audio_sent = 0
        for index in range(video_frames):
            for stream in (1, 3):
                out.append((stream, index * 3000, video[index % len(video)]))
            while audio_sent < (index + 1) * audio_per_video:
                for stream in (0, 2):
                    out.append((stream, audio_sent * AUDIO_SAMPLES, audio[audio_sent % len(audio)]))
                audio_sent += 1
        return out

    ordered = frames()
    sink = io.BytesIO()
    container = av.open(sink, mode="w", format=WEBM.muxer, options=dict(CONTAINER_OPTIONS))
    with Meter(None) as muxing, container as out:
        streams: list[Any] = []
        for kind in ("audio", "video", "audio", "video"):
            if kind == "audio":
                stream = out.add_mux_stream("opus", rate=AUDIO_RATE)
                stream.time_base = Fraction(1, AUDIO_RATE)
            else:
                stream = out.add_mux_stream("vp8", width=640, height=480)
                stream.time_base = Fraction(1, 90000)
            streams.append(stream)
        for index, pts, data in ordered:
            packet = av.Packet(data)
            packet.stream = streams[index]
            packet.time_base = streams[index].time_base
            packet.pts = packet.dts = pts
            out.mux(packet)
    return {
        "media_s": params["seconds"],
        "frames": len(ordered),
        "muxing_cpu_s": round(muxing.cpu_s, 3),
        "muxing_wall_s": round(muxing.wall_s, 3),
        "bytes": sink.tell(),
    }


class NullSink(io.RawIOBase):
    """Counts what it is given and keeps nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.size += len(data)
        return len(data)


def store_throughput(params: dict[str, Any]) -> dict[str, Any]:
    """EncryptingWriter and decrypt_chunks over ``mib`` MiB in 64 KiB pieces."""
    piece = os.urandom(64 * 1024)
    pieces = int(params["mib"]) * 16
    total = pieces * len(piece)
    key, file_id = new_data_key(), uuid.uuid4()
    figures: dict[str, Any] = {"plaintext_bytes": total, "chunk_size": DEFAULT_CHUNK_SIZE}

    def mb_per_s(meter: Meter) -> float:
        return round(total / meter.wall_s / 1e6, 1)

    aead = AESGCM(key)
    with Meter(None) as meter:
        for index in range(pieces):
            aead.encrypt(index.to_bytes(12, "big"), piece, None)
    figures["aesgcm_alone_mb_s"] = mb_per_s(meter)

    with Meter(None) as meter:
        writer = EncryptingWriter(cast(BinaryIO, NullSink()), key, file_id)
        for _ in range(pieces):
            writer.write(piece)
        writer.close()
    figures["writer_null_mb_s"] = mb_per_s(meter)

    directory = Path(tempfile.mkdtemp(prefix="vc-bench-store-"))
    try:
        store = FileStore(directory / "recordings")
        for name, sync in (("writer_file", False), ("writer_file_fsync", True)):
            file_name = f"{name}.vcenc"
            with Meter(None) as meter:
                sink = store.create(file_name)
                writer = EncryptingWriter(sink, key, file_id)
                for _ in range(pieces):
                    writer.write(piece)
                writer.close()
                if sync:
                    os.fsync(sink.fileno())
                sink.close()
            figures[f"{name}_mb_s"] = mb_per_s(meter)
            figures[f"{name}_cpu_pct"] = round(100 * meter.cpu_s / meter.wall_s, 1)
        figures["file_bytes"] = store.path("writer_file.vcenc").stat().st_size
        with Meter(None) as meter, store.open("writer_file.vcenc") as source:
            read = sum(len(c) for c in decrypt_chunks(source, key, file_id=file_id))
        if read != total:
            raise RuntimeError(f"decrypted {read} bytes of {total}")
        figures["decrypt_file_mb_s"] = mb_per_s(meter)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return figures


def child_main(mode: str, params: dict[str, Any]) -> int:
    """Run one measurement in this (child) process; print its figures as JSON."""
    cpu = params.get("cpu")
    if cpu is not None:
        # Every thread there is now; threads made later (aiortc's) inherit it.
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), {cpu})
    if mode == "pyav":
        result = pyav_alone(params)
    elif mode == "store":
        result = store_throughput(params)
    else:
        run = generate if mode == "generate" else record
        result = run_loop(run(params))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------
# The parent: runs the children, judges, reports.
# --------------------------------------------------------------------------


def in_child(mode: str, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, "--params", json.dumps(params)]
    done = subprocess.run(  # noqa: S603 - our own interpreter and script
        command, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=ROOT
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise RuntimeError(f"{mode} {params} exited {done.returncode}: {done.stderr.strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, json.loads(args.params))
    results: dict[str, Any] = {
        "machine": machine(args),
        "settings": dict(vars(args)),
        "consults": [],
        "capacity": [],
        "capacity_runs": [],
        "store": [],
        "raw": [],
        "failures": [],
        "skipped": [],
    }
    invocation = Invocation(
        results, kind="recording", max_minutes=args.max_minutes, save=not args.no_save
    )
    over_budget, save = invocation.over_budget, invocation.save
    print(f"bench: {json.dumps(results['machine'])}", flush=True)

    def child(mode: str, **params: Any) -> dict[str, Any]:
        timeout = params.get("seconds", 0) * 3 + 120
        result = in_child(mode, params, timeout)
        results["raw"].append({"mode": mode, "params": params, "result": result})
        return result

    # The measurements alternate within each repetition, so that drift of the
    # shared machine hits all of them alike.
    for rep in range(1, args.runs + 1):
        if not over_budget(f"consult run {rep}"):
            try:
                gen = child("generate", consults=1, seconds=args.seconds)
                rec = child("record", consults=1, seconds=args.seconds)
                refs = [child("pyav", seconds=args.seconds)]
                figures = consult_figures(rep, gen, rec, refs)
                results["consults"].append(figures)
                results["failures"] += [f"consult run {rep}: {p}" for p in figures["problems"]]
                print(f"bench: run {rep} consult: {figures}", flush=True)
            except Exception as err:
                traceback.print_exc()
                results["failures"].append(f"consult run {rep}: {err!r}")
        largest = 0
        for n in range(1, args.max_consults + 1):
            if over_budget(f"capacity run {rep} N={n}"):
                break
            try:
                run = child("record", consults=n, seconds=args.capacity_seconds, cpu=args.cpu)
            except Exception as err:
                traceback.print_exc()
                results["failures"].append(f"capacity run {rep} N={n}: {err!r}")
                break
            streams = [s for f in run["files"] for s in f["streams"]]
            figures = {
                "run": rep,
                "consults": n,
                "cpu_pct_of_core": run["cpu_pct_of_core"],
                "busy_pct": run["busy_pct"],
                "others_pct": round(max(0.0, run["busy_pct"] - run["cpu_pct_of_core"]), 1),
                "min_frame_share": min(s["share"] for s in streams),
                "worst_backlog_s": max(s["backlog_at_stop_s"] for s in streams),
                "worst_lag_p99_s": max(s["lag_p99_s"] for s in streams),
                "problems": judge(run),
            }
            results["capacity"].append(figures)
            print(f"bench: run {rep} capacity: {figures}", flush=True)
            if figures["problems"]:
                break
            largest = n
        results["capacity_runs"].append({"run": rep, "largest_passing": largest})
        if not over_budget(f"store run {rep}"):
            try:
                store = child("store", mib=args.store_mib)
                results["store"].append({"run": rep, **store})
                print(f"bench: run {rep} store: {store}", flush=True)
            except Exception as err:
                traceback.print_exc()
                results["failures"].append(f"store run {rep}: {err!r}")
        save()

    results["machine"]["loadavg_at_end"] = loadavg()
    invocation.finish(summary_table)
    return 1 if results["failures"] or results["skipped"] else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every measurement")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="length of the one-consult CPU runs"
    )
    parser.add_argument(
        "--capacity-seconds", type=float, default=15.0, help="length of each capacity run"
    )
    parser.add_argument(
        "--max-consults", type=int, default=8, help="the largest N the capacity runs try"
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=max(os.sched_getaffinity(0)),
        help="the core the capacity runs are pinned to (default: the last one)",
    )
    parser.add_argument("--store-mib", type=int, default=256, help="MiB through the store")
    parser.add_argument(
        "--max-minutes", type=float, default=15.0, help="no new measurement starts after this"
    )
    parser.add_argument("--no-save", action="store_true", help="print only, no bench/results/")
    parser.add_argument(
        "--child", choices=["generate", "record", "pyav", "store"], help=argparse.SUPPRESS
    )
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
