#!/usr/bin/env python3
"""Recording benchmark: CPU per minute of a recorded consult, consults one core records, store MB/s.

Run from the repository root (see docs/benchmarks.md, "Recording"):

    .venv/bin/python bench/recording.py --runs 3

A *consult* here is the server's recording path without the network: four
synthetic source tracks (therapist microphone and camera, patient
microphone and camera) at real-time pace, handed to
``signaling.recorder.ConsultRecorder`` as its peer connections would hand
over the received tracks, so that ``start`` wraps them in ``RecordedTrack``
(one ``Timeline``), opens aiortc's ``MediaRecorder`` (matroska, libx264
``veryfast``/``zerolatency`` at the configured 640x480, AAC) and writes into
an ``audit.filestore.EncryptingWriter`` over a real file created by
``audit.recordings.FileStore`` in a new temp directory (removed afterwards),
its watchdog flushing pending ciphertext every second, as in the server.
What the network adds in the server (ICE, SRTP, the jitter buffer, decoding
VP8/Opus) is not measured.

The sources: a microphone as aiortc's Opus decoder delivers it (20 ms
frames of 48 kHz stereo s16; a voice-like tone, not silence) and a 30 fps
camera of 640x480 pictures with moving content (FFmpeg's ``testsrc2`` with
temporal noise, 90 pictures rendered once and played back and forth), paced
like aiortc's ``VideoStreamTrack``.

Per run, each measurement in a fresh child process (its CPU time is the
consult's alone; ``time.process_time`` counts every thread, libx264's too):

- *generate*: one consult's sources read by a plain loop for
  ``--seconds``, no recording: the cost of the synthetic frames;
- *record*: one consult recorded for ``--seconds``: the recorder's CPU per
  minute is (record - generate) CPU per second x 60; the file size per
  minute; the frames in the decrypted file, counted by decoding it;
- *PyAV alone*: the same media (both cameras, both microphones, as many
  frames as ``--seconds`` of a consult) encoded with PyAV alone into
  matroska in memory, as fast as it goes, no aiortc, asyncio or encryption;
  the frame generation is timed separately and subtracted;
- *capacity*: the child pinned to one core (``--cpu``), N consults at once
  for ``--capacity-seconds``, N = 1, 2, ... until one fails or
  ``--max-consults``. A run passes when every stream of every file holds at
  least 95 % of the frames a real-time source produces in the time (video
  30/s, AAC 48000/1024 per second), no source is more than 0.5 s behind its
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
from collections.abc import Iterator
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
    AAC_FRAME_SAMPLES,
    AUDIO_RATE,
    AUDIO_SAMPLES,
    FPS,
    HEIGHT,
    WIDTH,
    SourceTrack,
    audio_frame,
    camera_pictures,
    consult_sources,
    video_frame,
    voice_samples,
)
from av import AudioFrame, VideoFrame
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from audit.filestore import (
    DEFAULT_CHUNK_SIZE,
    EncryptingWriter,
    decrypt_chunks,
    new_data_key,
)
from audit.recordings import FileStore
from signaling.protocol import ParticipantRole
from signaling.recorder import (
    CONTAINER_FORMAT,
    CONTAINER_OPTIONS,
    VIDEO_CODEC_OPTIONS,
    ConsultRecorder,
    Failure,
    RecorderSettings,
)

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


async def generate(params: dict[str, Any]) -> dict[str, Any]:
    """The sources of ``consults`` consults read by a plain loop: the frames' cost."""
    pictures, voice = camera_pictures(), voice_samples()
    sources = [
        t
        for _ in range(params["consults"])
        for ts in consult_sources(pictures, voice).values()
        for t in ts
    ]

    async def drain(track: SourceTrack) -> None:
        while True:
            await track.recv()

    with Meter(params.get("cpu")) as meter:
        readers = [asyncio.create_task(drain(t)) for t in sources]
        await asyncio.sleep(params["seconds"])
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for track in sources:
            track.stop()
    return {**meter.figures(), "sources": [t.pace.figures() for t in sources]}


@dataclass
class BenchConsult:
    """One consult's recording into a real encrypted file."""

    store: FileStore
    pictures: list[tuple[bytes, ...]]
    voice: bytes

    def __post_init__(self) -> None:
        self.file_id = uuid.uuid4()
        self.file_name = f"{self.file_id}.vcenc"
        self.key = new_data_key()
        self.sources = consult_sources(self.pictures, self.voice)
        self.failures: list[str] = []
        self.recorder = ConsultRecorder(
            settings=RecorderSettings(video_width=WIDTH, video_height=HEIGHT),
            on_failure=self._failed,
        )
        # What accept_offer collects from a participant's peer connection
        # ("track" events); start() takes it from here, so everything after
        # the network is the server's own code.
        self.recorder._tracks = {role: list(ts) for role, ts in self.sources.items()}

    async def _failed(self, failure: Failure, detail: str) -> None:
        self.failures.append(f"{failure.value}: {detail}")

    async def start(self) -> None:
        # As audit.recordings.start_recording opens it.
        writer = EncryptingWriter(
            self.store.create(self.file_name), self.key, self.file_id, owns_sink=True
        )
        self.started = time.monotonic()
        await self.recorder.start(writer)

    async def stop(self) -> dict[str, Any]:
        self.elapsed_s = time.monotonic() - self.started
        result = await self.recorder.stop()
        return {"complete": result.complete, "handed_to_recorder": result.frames}

    def sources_in_file_order(self) -> list[tuple[str, SourceTrack]]:
        """(label, source) in the order of the file's streams."""
        return [
            (f"{role.value} {kind}", t)
            for role in (ParticipantRole.THERAPIST, ParticipantRole.PATIENT)
            for kind in ("audio", "video")
            for t in self.sources[role]
            if t.kind == kind
        ]


def count_frames(media: bytes) -> list[dict[str, Any]]:
    """Decode every stream of a matroska file; frames per stream."""
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
    pictures, voice = camera_pictures(), voice_samples()
    directory = Path(tempfile.mkdtemp(prefix="vc-bench-recording-"))
    try:
        store = FileStore(directory / "recordings")
        consults = [BenchConsult(store, pictures, voice) for _ in range(params["consults"])]
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
                rate = FPS if stream["kind"] == "video" else AUDIO_RATE / AAC_FRAME_SAMPLES
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
    """The same media encoded by PyAV alone, as fast as it goes, into memory."""
    pictures, voice = camera_pictures(), voice_samples()
    video_frames = round(params["seconds"] * FPS)
    audio_per_video = AUDIO_RATE / AUDIO_SAMPLES / FPS  # 50 / 30

    def frames() -> Iterator[tuple[int, AudioFrame | VideoFrame]]:
        """(stream, frame) in time order: cameras at 30/s, microphones at 50/s."""
        audio_sent = 0
        for index in range(video_frames):
            for stream in (1, 3):
                picture = video_frame(pictures, index)
                picture.pts, picture.time_base = index * 3000, Fraction(1, 90000)
                yield stream, picture
            while audio_sent < (index + 1) * audio_per_video:
                for stream in (0, 2):
                    sound = audio_frame(voice, audio_sent)
                    sound.pts = audio_sent * AUDIO_SAMPLES
                    sound.time_base = Fraction(1, AUDIO_RATE)
                    yield stream, sound
                audio_sent += 1

    with Meter(None) as making:
        made = sum(1 for _ in frames())
    sink = io.BytesIO()
    container = av.open(sink, mode="w", format=CONTAINER_FORMAT, options=CONTAINER_OPTIONS)
    with Meter(None) as encoding, container as out:
        streams: list[Any] = []
        for kind in ("audio", "video", "audio", "video"):
            if kind == "audio":
                streams.append(out.add_stream("aac"))
            else:
                stream = out.add_stream("libx264", rate=FPS)
                stream.pix_fmt, stream.width, stream.height = "yuv420p", WIDTH, HEIGHT
                stream.codec_context.options = {
                    **VIDEO_CODEC_OPTIONS,
                    "preset": params.get("preset", VIDEO_CODEC_OPTIONS["preset"]),
                }
                streams.append(stream)
        for index, frame in frames():
            for packet in streams[index].encode(frame):
                out.mux(packet)
        for stream in streams:
            for packet in stream.encode(None):
                out.mux(packet)
    return {
        "preset": params.get("preset", VIDEO_CODEC_OPTIONS["preset"]),
        "media_s": params["seconds"],
        "frames": made,
        "making_cpu_s": round(making.cpu_s, 3),
        "encoding_cpu_s": round(encoding.cpu_s, 3),
        "encoding_wall_s": round(encoding.wall_s, 3),
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
        # Every thread there is now; threads made later (libx264's) inherit it.
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
                refs = [
                    child("pyav", seconds=args.seconds, preset=preset)
                    for preset in args.reference_presets
                ]
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
    parser.add_argument(
        "--reference-presets",
        nargs="+",
        default=["veryfast", "ultrafast"],
        help="x264 presets of the PyAV-alone reference (the recorder's is veryfast)",
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
