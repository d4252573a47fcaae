"""The encrypted file store: a streaming, chunked authenticated encryption format.

Every file has its own random 256-bit data key (AES-256-GCM). The data key
never touches the disk in the clear: it is wrapped (sealed) by the master key
and kept in the database, next to the id of the master key that wrapped it.
Destroying the wrapped key makes the file unreadable for good
(crypto-shredding), whatever happens to the file afterwards.

Layout (all integers big-endian)::

    header:  b"VCENC" | version (1 byte, 1) | file id (16 bytes, a UUID)
             | nonce prefix (4 random bytes) | chunk size (4 bytes)
    chunk*:  flag (1 byte: 0 = more follow, 1 = final) | length (4 bytes)
             | ciphertext (length bytes: the chunk's plaintext + 16-byte tag)

Chunk ``i`` (from 0) is encrypted with the nonce ``prefix | i`` (8 bytes) and
the associated data ``header | i | flag``. So a modified byte anywhere, a
chunk moved, dropped or taken from another file, and a changed header fail
authentication; a file that ends without a final chunk is truncated, and is
reported as such (what came before it still decrypts). Plaintext chunks are
at most ``chunk size`` bytes: full ones, shorter ones where the writer was told
to put what it had on disk (:meth:`EncryptingWriter.write_pending`), and the
final one, possibly empty.

The writer is a file-like object (``write``/``close``) that encrypts as it
goes: plaintext exists only in memory, one chunk at a time.
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from audit.errors import AuditError

MAGIC = b"VCENC"
VERSION = 1
DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
_HEADER = struct.Struct(">5sB16s4sI")
_CHUNK_HEAD = struct.Struct(">BI")
_TAG = 16
HEADER_SIZE = _HEADER.size


class StoreError(AuditError):
    """An encrypted file does not open; the message says how."""


class Tampered(StoreError):
    """A chunk or the header fails authentication (changed, moved, dropped, foreign)."""


class Truncated(StoreError):
    """The file ends without its final chunk (e.g. the writer died)."""

    def __init__(self, message: str, *, plaintext_bytes: int) -> None:
        super().__init__(message)
        self.plaintext_bytes = plaintext_bytes


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">Q", index)


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">QB", index, 1 if final else 0)


class EncryptingWriter:
    """Write plaintext; what reaches ``sink`` is already encrypted.

    ``close()`` writes the final chunk; a writer that is never closed leaves
    a truncated file, which the reader reports.
    """

    def __init__(
        self,
        sink: BinaryIO,
        data_key: bytes,
        file_id: uuid.UUID,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        owns_sink: bool = False,
        avoid_prefix: bytes | None = None,
    ) -> None:
        """``owns_sink``: close ``sink`` too on :meth:`close`. ``avoid_prefix``:
        the nonce prefix of another file under the same key (a copy of it):
        this one draws another, so no nonce is used twice under the key."""
        if not 16 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be 16 to {MAX_CHUNK_SIZE} bytes")
        self._sink = sink
        self._aead = AESGCM(data_key)
        self._prefix = os.urandom(4)
        while self._prefix == avoid_prefix:
            self._prefix = os.urandom(4)
        self._chunk_size = chunk_size
        self._header = _HEADER.pack(MAGIC, VERSION, file_id.bytes, self._prefix, chunk_size)
        self._buffer = bytearray()
        self._index = 0
        self._closed = False
        self._owns_sink = owns_sink
        self.plaintext_bytes = 0
        sink.write(self._header)

    # File-like enough for PyAV and shutil.copyfileobj.
    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed encrypted file")
        self._buffer += data
        self.plaintext_bytes += len(data)
        while len(self._buffer) > self._chunk_size:
            self._emit(bytes(self._buffer[: self._chunk_size]), final=False)
            del self._buffer[: self._chunk_size]
        return len(data)

    def flush(self) -> None:
        self._sink.flush()

    @property
    def pending_bytes(self) -> int:
        """Plaintext held in memory, not yet in a chunk on disk."""
        return len(self._buffer)

    def write_pending(self) -> None:
        """Write what is buffered now as a (shorter) chunk and flush it to disk,
        so that a writer that dies loses no more than came after this call."""
        if self._closed or not self._buffer:
            return
        self._emit(bytes(self._buffer), final=False)
        self._buffer.clear()
        self._sink.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._emit(bytes(self._buffer), final=True)
        self._buffer.clear()
        self._closed = True
        self._sink.flush()
        if self._owns_sink:
            self._sink.close()

    def abort(self) -> None:
        """Close without the final chunk (the disk filled up, the writer failed):
        the file then reads as truncated, up to its last whole chunk."""
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        if self._owns_sink:
            # A full disk may refuse the flush of the last bytes too.
            with contextlib.suppress(OSError):
                self._sink.close()

    def _emit(self, plaintext: bytes, *, final: bool) -> None:
        ciphertext = self._aead.encrypt(
            _nonce(self._prefix, self._index), plaintext, _aad(self._header, self._index, final)
        )
        self._sink.write(_CHUNK_HEAD.pack(1 if final else 0, len(ciphertext)) + ciphertext)
        self._index += 1

    def __enter__(self) -> EncryptingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HeadPatchingWriter(EncryptingWriter):
    """An :class:`EncryptingWriter` that can go back and rewrite its first chunk.

    For a muxer that writes to a seekable file and, at its end, seeks back to
    fill in what it knows only then (a Matroska file's duration and the
    position of its index, in its first few hundred bytes). The first chunk's
    plaintext stays in memory until :meth:`close`, which encrypts it into the
    place kept for it at the start of ``sink`` (a seekable file; until then the
    place holds zeros, so a file whose writer died does not open, which is
    why this writer is for files made from another one, never for a live
    recording). Writes anywhere else than inside the first chunk or at the
    end raise :class:`OSError`. The file's format is the same.
    """

    def __init__(
        self,
        sink: BinaryIO,
        data_key: bytes,
        file_id: uuid.UUID,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        owns_sink: bool = False,
        avoid_prefix: bytes | None = None,
    ) -> None:
        super().__init__(
            sink,
            data_key,
            file_id,
            chunk_size=chunk_size,
            owns_sink=owns_sink,
            avoid_prefix=avoid_prefix,
        )
        self._head = bytearray()
        self._position = 0
        self._head_placed = False

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.plaintext_bytes}
        position = base[whence] + offset
        if not 0 <= position <= self.plaintext_bytes:
            raise OSError(f"cannot seek to {position}: the file has {self.plaintext_bytes} bytes")
        self._position = position
        return position

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed encrypted file")
        data = bytes(data)
        if self._position < self.plaintext_bytes:
            end = self._position + len(data)
            if end > min(len(self._head), self.plaintext_bytes):
                raise OSError(
                    f"only the first chunk can be rewritten: {len(data)} bytes at "
                    f"{self._position} reach beyond it"
                )
            self._head[self._position : end] = data
            self._position = end
            return len(data)
        room = self._chunk_size - len(self._head)
        self._head += data[:room]
        rest = data[room:]
        self.plaintext_bytes += len(data) - len(rest)
        if rest:
            if not self._head_placed:
                # Zeros where the first chunk goes, its frame's size exactly.
                self._sink.write(bytes(_CHUNK_HEAD.size + self._chunk_size + _TAG))
                self._head_placed = True
                self._index = 1
            super().write(rest)
        self._position = self.plaintext_bytes
        return len(data)

    def close(self) -> None:
        if self._closed:
            return
        if not self._head_placed:
            self._buffer = self._head
            super().close()
            return
        self._emit(bytes(self._buffer), final=True)
        self._buffer.clear()
        self._closed = True
        self._sink.seek(HEADER_SIZE)
        self._index = 0
        self._emit(bytes(self._head), final=False)
        self._head.clear()
        self._sink.flush()
        if self._owns_sink:
            self._sink.close()


def nonce_prefix(header: bytes) -> bytes:
    """The nonce prefix a file's raw header (:func:`read_header`) names."""
    prefix: bytes = _HEADER.unpack(header)[3]
    return prefix


def read_header(source: BinaryIO) -> tuple[uuid.UUID, bytes]:
    """The file id and the raw header; raises :class:`StoreError` for a foreign file."""
    header = source.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        raise Truncated("the file ends inside its header", plaintext_bytes=0)
    magic, version, file_id, _prefix, chunk_size = _HEADER.unpack(header)
    if magic != MAGIC:
        raise StoreError("not an encrypted videoconsult file")
    if version != VERSION:
        raise StoreError(f"encrypted file version {version} is not known (expected {VERSION})")
    if not 16 <= chunk_size <= MAX_CHUNK_SIZE:
        raise Tampered("the header's chunk size is out of range")
    return uuid.UUID(bytes=file_id), header


def decrypt_chunks(
    source: BinaryIO, data_key: bytes, *, file_id: uuid.UUID | None = None
) -> Iterator[bytes]:
    """Yield the plaintext chunk by chunk (memory independent of file size).

    Raises :class:`Tampered` at the first chunk that fails authentication,
    :class:`Truncated` when the file ends without its final chunk (after
    yielding everything before it), :class:`StoreError` for a foreign file.
    """
    found_id, header = read_header(source)
    if file_id is not None and found_id != file_id:
        raise Tampered(f"this file belongs to {found_id}, not to {file_id}")
    _magic, _version, _id, prefix, chunk_size = _HEADER.unpack(header)
    aead = AESGCM(data_key)
    index, produced = 0, 0
    while True:
        head = source.read(_CHUNK_HEAD.size)
        if len(head) < _CHUNK_HEAD.size:
            raise Truncated(
                f"the file ends after {index} chunks without its final chunk; "
                f"{produced} bytes decrypted before the cut",
                plaintext_bytes=produced,
            )
        flag, length = _CHUNK_HEAD.unpack(head)
        if flag not in (0, 1) or not _TAG <= length <= chunk_size + _TAG:
            raise Tampered(f"chunk {index} has a damaged frame")
        ciphertext = source.read(length)
        if len(ciphertext) < length:
            raise Truncated(
                f"the file ends inside chunk {index}; {produced} bytes decrypted before the cut",
                plaintext_bytes=produced,
            )
        final = flag == 1
        try:
            plaintext = aead.decrypt(_nonce(prefix, index), ciphertext, _aad(header, index, final))
        except InvalidTag:
            raise Tampered(
                f"chunk {index} fails authentication (changed, moved, dropped or not this file's)"
            ) from None
        produced += len(plaintext)
        yield plaintext
        if final:
            if source.read(1):
                raise Tampered(f"data follows the final chunk ({index})")
            return
        index += 1


@dataclass(frozen=True)
class _Chunk:
    offset: int  # of its ciphertext in the file
    length: int  # of its ciphertext
    start: int  # of its plaintext in the whole plaintext
    final: bool


@dataclass(frozen=True)
class ChunkMap:
    """Where each chunk of a file lies, read from the chunks' heads alone (no
    decryption): enough to decrypt any byte range without the chunks before it."""

    header: bytes
    chunks: tuple[_Chunk, ...]
    # Whether the file ends with its final chunk (else it is truncated).
    complete: bool

    @property
    def plaintext_size(self) -> int:
        if not self.chunks:
            return 0
        last = self.chunks[-1]
        return last.start + last.length - _TAG


def map_chunks(source: BinaryIO, *, file_id: uuid.UUID | None = None) -> ChunkMap:
    """Read the chunks' heads of a seekable ``source`` (a few bytes each).

    A file cut inside a chunk ends at the chunk before; :class:`Tampered`
    for a damaged frame or another file's id."""
    found_id, header = read_header(source)
    if file_id is not None and found_id != file_id:
        raise Tampered(f"this file belongs to {found_id}, not to {file_id}")
    chunk_size = _HEADER.unpack(header)[4]
    end = source.seek(0, os.SEEK_END)
    offset, start = HEADER_SIZE, 0
    chunks: list[_Chunk] = []
    while offset + _CHUNK_HEAD.size <= end:
        source.seek(offset)
        flag, length = _CHUNK_HEAD.unpack(source.read(_CHUNK_HEAD.size))
        if flag not in (0, 1) or not _TAG <= length <= chunk_size + _TAG:
            raise Tampered(f"chunk {len(chunks)} has a damaged frame")
        body = offset + _CHUNK_HEAD.size
        if body + length > end:
            break  # cut inside this chunk
        chunks.append(_Chunk(body, length, start, flag == 1))
        start += length - _TAG
        offset = body + length
        if flag == 1:
            if offset != end:
                raise Tampered(f"data follows the final chunk ({len(chunks) - 1})")
            return ChunkMap(header, tuple(chunks), complete=True)
    return ChunkMap(header, tuple(chunks), complete=False)


def readable_bytes(path: str | os.PathLike[str]) -> int:
    """How many plaintext bytes a reader gets of the file at ``path``: its whole
    chunks (a truncated file's end is cut off). Reads chunk heads only."""
    with open(path, "rb") as source:
        return map_chunks(source).plaintext_size


def decrypt_range(
    source: BinaryIO, data_key: bytes, chunk_map: ChunkMap, first: int, last: int
) -> Iterator[bytes]:
    """The plaintext bytes ``first`` to ``last`` (inclusive), decrypting only
    the chunks that hold them; :class:`Tampered` at a chunk that fails
    authentication."""
    prefix = _HEADER.unpack(chunk_map.header)[3]
    aead = AESGCM(data_key)
    starts = [chunk.start for chunk in chunk_map.chunks]
    index = max(0, bisect_right(starts, first) - 1)
    while index < len(chunk_map.chunks) and chunk_map.chunks[index].start <= last:
        chunk = chunk_map.chunks[index]
        source.seek(chunk.offset)
        ciphertext = source.read(chunk.length)
        try:
            plaintext = aead.decrypt(
                _nonce(prefix, index), ciphertext, _aad(chunk_map.header, index, chunk.final)
            )
        except InvalidTag:
            raise Tampered(
                f"chunk {index} fails authentication (changed, moved, dropped or not this file's)"
            ) from None
        yield plaintext[max(0, first - chunk.start) : last - chunk.start + 1]
        index += 1
