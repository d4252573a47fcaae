"""A finished recording's file holds its duration and an index (cues), so a
player knows the length and seeks without reading the whole file.

Real aiortc peers record through a ``ConsultRecorder``; the decrypted file's
top level is read with tests/support/ebml.py (written from the Matroska
specification) and opened with PyAV through a reader that cannot seek, so
that the duration PyAV reports comes from the header, not from a scan.
The writer that makes this possible (:class:`HeadPatchingWriter`) is tested
on its own first.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

import av
import pytest

import signaling.recording_types
from audit.filestore import (
    HEADER_SIZE,
    HeadPatchingWriter,
    decrypt_chunks,
    decrypt_range,
    map_chunks,
    new_data_key,
)
from audit.recordings import FileStore
from signaling.media_codecs import WEBM, MediaCodec, is_keyframe
from signaling.muxer import PacketMuxer, StreamSpec
from signaling.protocol import ParticipantRole
from signaling.remux import RemuxError, make_seekable
from tests.support.ebml import CUES, read_top_level
from tests.support.recording import (
    RecorderLink,
    count_streams,
    encoded,
    new_recording_file,
    read_recording_file,
    record_links,
)

THERAPIST, PATIENT = ParticipantRole.THERAPIST, ParticipantRole.PATIENT
CHUNK = 64


class _ForwardOnly(io.RawIOBase):
    """Bytes a reader can only read front to back: nothing found by a scan."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        piece = self._data.read(len(buffer))
        buffer[: len(piece)] = piece
        return len(piece)


def _written(tmp_path: Path, *pieces: tuple[int | None, bytes]) -> tuple[Path, bytes, uuid.UUID]:
    """Write ``pieces`` (a position to seek to first, or None: at the end)."""
    key, file_id = new_data_key(), uuid.uuid4()
    path = tmp_path / "file.vcenc"
    with open(path, "w+b") as sink:
        writer = HeadPatchingWriter(sink, key, file_id, chunk_size=CHUNK)
        for position, data in pieces:
            if position is None:
                writer.seek(0, os.SEEK_END)
            else:
                writer.seek(position)
            writer.write(data)
        writer.close()
    return path, key, file_id


def test_a_head_patching_writer_rewrites_its_first_chunk_and_the_file_reads_as_any(
    tmp_path: Path,
) -> None:
    body = bytes(range(256)) * 2
    path, key, file_id = _written(tmp_path, (None, body), (10, b"PATCHED"), (None, b"tail"))
    expected = bytearray(body + b"tail")
    expected[10:17] = b"PATCHED"
    with open(path, "rb") as source:
        assert b"".join(decrypt_chunks(source, key, file_id=file_id)) == expected
    with open(path, "rb") as source:
        chunk_map = map_chunks(source, file_id=file_id)
        assert chunk_map.complete
        assert chunk_map.plaintext_size == len(expected)
        assert b"".join(decrypt_range(source, key, chunk_map, 5, 20)) == expected[5:21]
    # What reached the disk is ciphertext: the patch is not in it.
    assert b"PATCHED" not in path.read_bytes()


def test_a_file_within_one_chunk_is_written_whole_at_close(tmp_path: Path) -> None:
    path, key, file_id = _written(tmp_path, (None, b"a" * 40), (0, b"b"))
    with open(path, "rb") as source:
        assert b"".join(decrypt_chunks(source, key, file_id=file_id)) == b"b" + b"a" * 39


def test_a_head_patching_writer_refuses_a_rewrite_beyond_its_first_chunk(tmp_path: Path) -> None:
    with open(tmp_path / "file.vcenc", "w+b") as sink:
        writer = HeadPatchingWriter(sink, new_data_key(), uuid.uuid4(), chunk_size=CHUNK)
        writer.write(b"x" * (CHUNK * 3))
        writer.seek(CHUNK + 1)
        with pytest.raises(OSError, match="only the first chunk can be rewritten"):
            writer.write(b"y")
        writer.seek(CHUNK - 2)
        with pytest.raises(OSError, match="only the first chunk"):
            writer.write(b"yyyy")
        with pytest.raises(OSError, match="cannot seek to"):
            writer.seek(CHUNK * 3 + 1)


def test_a_head_patching_writer_that_never_closes_leaves_no_readable_head(tmp_path: Path) -> None:
    """Its first chunk is zeros until the close: such a file is never a recording's
    live file, only the remux's copy, which replaces the live one when whole."""
    key, file_id = new_data_key(), uuid.uuid4()
    with open(tmp_path / "file.vcenc", "w+b") as sink:
        writer = HeadPatchingWriter(sink, key, file_id, chunk_size=CHUNK)
        writer.write(b"z" * (CHUNK * 2 + 5))
        sink.flush()
    data = (tmp_path / "file.vcenc").read_bytes()
    assert data[HEADER_SIZE : HEADER_SIZE + 5 + CHUNK + 16] == bytes(5 + CHUNK + 16)


@pytest.mark.webrtc
@pytest.mark.recorder
async def test_a_finished_recording_has_its_duration_and_cues_in_the_file() -> None:
    recording = await record_links(
        {THERAPIST: RecorderLink(video=(320, 240)), PATIENT: RecorderLink(video=(160, 120))}, 4.0
    )
    assert recording.failures == []
    assert recording.result.complete
    assert recording.result.plaintext_bytes == len(recording.media)
    top = read_top_level(recording.media)
    assert top.segment_size_known
    assert top.duration_s is not None
    # The header says what a scan of every frame finds, and that is about the
    # time recorded (later by as much as lip sync moved a stream forward).
    scanned_s = max(stream.duration_s for stream in count_streams(recording.media))
    assert abs(top.duration_s - scanned_s) < 0.05, (top.duration_s, scanned_s)
    assert abs(top.duration_s - recording.truth_s) < 1.0, (top.duration_s, recording.truth_s)
    # The SeekHead at the start points at the Cues, at the end, which index the clusters.
    assert top.seek_entries.get(CUES) == top.children[CUES][0]
    assert top.cue_points >= 1
    # PyAV, unable to scan, takes the duration from the header.
    with av.open(_ForwardOnly(recording.media), mode="r") as container:
        assert container.duration is not None
        assert abs(container.duration / 1e6 - scanned_s) < 0.05
    # And seeks with the index: to the middle, then reads on from there.
    with av.open(io.BytesIO(recording.media), mode="r") as container:
        video = container.streams.video[0]
        middle_s = recording.truth_s / 2
        container.seek(int(middle_s * 1e6), any_frame=False)
        packet = next(p for p in container.demux(video) if p.pts is not None)
        assert packet.is_keyframe
        assert packet.pts is not None
        assert video.time_base is not None
        assert packet.pts * video.time_base <= middle_s + 0.1


@pytest.mark.webrtc
@pytest.mark.recorder
async def test_a_remux_that_runs_out_of_time_leaves_the_streamed_file_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(signaling.recording_types, "REMUX_BASE_S", 0.0)
    monkeypatch.setattr(signaling.recording_types, "REMUX_MIN_BYTES_PER_S", 10**15)
    recording = await record_links({THERAPIST: RecorderLink(video=(160, 120))}, 2.0)
    assert recording.failures == []
    assert recording.result.complete
    assert recording.result.plaintext_bytes == len(recording.media)
    top = read_top_level(recording.media)
    # The file as it was streamed: no duration and no index, every frame there.
    assert top.duration_s is None
    assert CUES not in top.children
    with av.open(io.BytesIO(recording.media), mode="r") as container:
        assert sum(1 for p in container.demux() if p.size) > 50


def test_a_remux_that_fails_leaves_the_file_as_it_was_and_no_copy(tmp_path: Path) -> None:
    file = new_recording_file(tmp_path)
    writer = file.open_writer()
    muxer = PacketMuxer(writer, [StreamSpec(MediaCodec.VP8, 90000)], WEBM)
    for index, frame in enumerate(encoded("libvpx", (160, 120), frames=30)):
        if index == 0:
            muxer.set_size(0, (160, 120))
        muxer.add(0, frame, index * 3000, keyframe=is_keyframe(MediaCodec.VP8, frame))
    muxer.close()
    writer.close()
    before = Path(file.path).read_bytes()
    with pytest.raises(RemuxError, match="took longer than"):
        make_seekable(file, WEBM.muxer, deadline_s=0.0)
    assert Path(file.path).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(file.path).name]
    # The same file remuxed in time gains its duration (30 frames at 30 a second).
    assert make_seekable(file, WEBM.muxer) > 0
    top = read_top_level(read_recording_file(file))
    assert top.duration_s is not None
    assert abs(top.duration_s - 1.0) < 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(file.path).name]


def test_a_copy_left_by_a_killed_remux_goes_with_its_recording(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    (tmp_path / "a.vcenc").write_bytes(b"ciphertext")
    (tmp_path / "a.vcenc.seekable").write_bytes(b"ciphertext and zeros")
    assert store.delete_files(["a.vcenc"]) == 1
    assert list(tmp_path.iterdir()) == []
