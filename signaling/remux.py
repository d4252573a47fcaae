"""A finished recording's file made seekable: its duration and an index (cues).

The recorder writes its file as a stream (a live file has to be readable up
to its last chunk if the worker dies), and libavformat's Matroska muxer
writes the segment's duration and its index (Cues, found through the
SeekHead at the start) only into an output it can seek back in. So when a
recording ends whole, :func:`make_seekable` copies its packets, unchanged,
into a second encrypted file whose writer can rewrite its first chunk
(:class:`audit.filestore.HeadPatchingWriter`), and puts that file in the
place of the first. Nothing is decoded or encoded (streams made from the
input's codec parameters, never opened); the plaintext exists only in
memory, a chunk and a packet at a time. A remux that fails or runs out of
time leaves the streamed file as it was: complete, only slower to seek in.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Iterator
from typing import Any

import av

from audit.filestore import HeadPatchingWriter, decrypt_chunks, nonce_prefix, read_header
from audit.recordings import COPY_SUFFIX, RecordingFile
from signaling.muxer import CONTAINER_OPTIONS


class RemuxError(Exception):
    """The file could not be made seekable; the streamed file is unchanged."""


class _DecryptingReader(io.RawIOBase):
    """The plaintext of an encrypted file, read front to back (not seekable)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def make_seekable(
    file: RecordingFile, container_format: str, *, deadline_s: float | None = None
) -> int:
    """Rewrite ``file`` with its duration and cues; return its new plaintext size.

    ``container_format``: libavformat's muxer (``webm`` or ``matroska``).
    Blocking (run it in a thread); raises :class:`RemuxError`, leaving the
    file as it was, when it fails or takes longer than ``deadline_s``.
    """
    started = time.monotonic()
    target = file.path + COPY_SUFFIX
    try:
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise RemuxError(f"the seekable copy cannot be created: {err.strerror}") from err
    replaced = False
    try:
        with (
            open(file.path, "rb") as source,
            os.fdopen(descriptor, "w+b") as sink,
        ):
            # The copy is under the same key: never with the original's nonces.
            _file_id, header = read_header(source)
            source.seek(0)
            writer = HeadPatchingWriter(
                sink, file.data_key, file.file_id, avoid_prefix=nonce_prefix(header)
            )
            reader = _DecryptingReader(decrypt_chunks(source, file.data_key, file_id=file.file_id))
            _copy_packets(reader, writer, container_format, started, deadline_s)
            writer.close()
            sink.flush()
            os.fsync(sink.fileno())
            size = writer.plaintext_bytes
        os.replace(target, file.path)
        replaced = True
        return size
    except RemuxError:
        raise
    except Exception as err:
        raise RemuxError(f"the remux failed: {type(err).__name__}: {str(err)[:200]}") from err
    finally:
        if not replaced:
            with contextlib.suppress(OSError):
                os.unlink(target)


def _copy_packets(
    reader: _DecryptingReader,
    writer: HeadPatchingWriter,
    container_format: str,
    started: float,
    deadline_s: float | None,
) -> None:
    with av.open(reader, mode="r") as source:
        output: Any = av.open(
            writer, mode="w", format=container_format, options=dict(CONTAINER_OPTIONS)
        )
        try:
            streams = {stream.index: _mux_stream_like(output, stream) for stream in source.streams}
            for packet in source.demux():
                if packet.dts is None and packet.size == 0:
                    continue  # the demuxer's end-of-stream mark
                if deadline_s is not None and time.monotonic() - started > deadline_s:
                    raise RemuxError(f"the remux took longer than {deadline_s:.0f} s")
                packet.stream = streams[packet.stream.index]
                output.mux(packet)
        finally:
            output.close()


def _mux_stream_like(output: Any, template: Any) -> Any:
    """A stream of ``output`` for ``template``'s packets, as the recorder's muxer
    makes them (``add_mux_stream``: no codec context, nothing to open)."""
    parameters = template.codec_context
    name = parameters.codec.name
    if template.type == "video":
        stream = output.add_mux_stream(name, width=parameters.width, height=parameters.height)
    else:
        stream = output.add_mux_stream(name, rate=parameters.sample_rate)
    stream.time_base = template.time_base
    return stream
