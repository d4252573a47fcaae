"""The encrypted file store: the format detects every kind of damage, no
plaintext reaches the disk, and crypto-shredding leaves no key that opens a file."""

from __future__ import annotations

import io
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from audit.consults import mark_ended
from audit.errors import NotFound
from audit.filestore import (
    HEADER_SIZE,
    EncryptingWriter,
    StoreError,
    Tampered,
    Truncated,
    decrypt_chunks,
    decrypt_range,
    map_chunks,
    new_data_key,
    nonce_prefix,
    read_header,
)
from audit.recordings import (
    FileStore,
    data_key_of,
    finish_recording,
    master_key_id,
    plaintext,
    start_recording,
)
from audit.retention import Retention, purge
from audit.schema import metadata, recordings
from server.app_keys import DATA_DIR, DB_ENGINE, FILE_STORE, MASTER_KEY
from tests.support.harness import Harness, new_consult

CHUNK = 64


def encrypt(data: bytes, key: bytes, file_id: uuid.UUID, *, close: bool = True) -> bytes:
    sink = io.BytesIO()
    writer = EncryptingWriter(sink, key, file_id, chunk_size=CHUNK)
    # In uneven pieces, as a muxer writes.
    for start in range(0, len(data), 37):
        writer.write(data[start : start + 37])
    if close:
        writer.close()
    return sink.getvalue()


def decrypt(blob: bytes, key: bytes, file_id: uuid.UUID | None = None) -> bytes:
    return b"".join(decrypt_chunks(io.BytesIO(blob), key, file_id=file_id))


def collect(pieces: Iterator[bytes], into: list[bytes]) -> None:
    for piece in pieces:
        into.append(piece)


def decrypt_file(path: Path, key: bytes, file_id: uuid.UUID) -> bytes:
    with open(path, "rb") as source:
        return b"".join(decrypt_chunks(source, key, file_id=file_id))


def chunks_of(blob: bytes) -> list[bytes]:
    """The framed chunks (flag, length, ciphertext) after the header."""
    found, at = [], HEADER_SIZE
    while at < len(blob):
        _flag, length = struct.unpack(">BI", blob[at : at + 5])
        found.append(blob[at : at + 5 + length])
        at += 5 + length
    return found


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 10 * CHUNK, 10 * CHUNK + 17])
def test_what_goes_in_comes_out(size: int) -> None:
    key, file_id = new_data_key(), uuid.uuid4()
    data = os.urandom(size)
    blob = encrypt(data, key, file_id)
    assert decrypt(blob, key, file_id) == data
    assert data[:16] not in blob or size < 16


def test_a_flipped_byte_anywhere_is_found() -> None:
    key, file_id = new_data_key(), uuid.uuid4()
    blob = encrypt(os.urandom(5 * CHUNK), key, file_id)
    for position in (HEADER_SIZE + 20, len(blob) // 2, len(blob) - 1, 10):
        damaged = bytearray(blob)
        damaged[position] ^= 0x01
        with pytest.raises(StoreError):
            decrypt(bytes(damaged), key, file_id)
    damaged = bytearray(blob)
    damaged[HEADER_SIZE + 30] ^= 0x80
    with pytest.raises(Tampered, match="chunk 0 fails authentication"):
        decrypt(bytes(damaged), key, file_id)


def test_dropped_reordered_and_foreign_chunks_are_found() -> None:
    key, file_id = new_data_key(), uuid.uuid4()
    blob = encrypt(os.urandom(5 * CHUNK), key, file_id)
    header, parts = blob[:HEADER_SIZE], chunks_of(blob)
    assert len(parts) == 5  # the fifth, full, is the final one
    dropped = header + b"".join(parts[:2] + parts[3:])
    with pytest.raises(Tampered, match="chunk 2"):
        decrypt(dropped, key, file_id)
    reordered = header + b"".join([parts[1], parts[0], *parts[2:]])
    with pytest.raises(Tampered, match="chunk 0"):
        decrypt(reordered, key, file_id)
    other = encrypt(os.urandom(5 * CHUNK), key, uuid.uuid4())
    spliced = header + b"".join([parts[0], chunks_of(other)[1], *parts[2:]])
    with pytest.raises(Tampered, match="chunk 1"):
        decrypt(spliced, key, file_id)
    with pytest.raises(Tampered, match="belongs to"):
        decrypt(other, key, file_id)
    with pytest.raises(Tampered, match="follows the final chunk"):
        decrypt(blob + parts[-1], key, file_id)
    with pytest.raises(Tampered):
        decrypt(blob, new_data_key(), file_id)


def test_a_truncated_file_gives_what_it_has_and_says_it_is_cut() -> None:
    key, file_id = new_data_key(), uuid.uuid4()
    data = os.urandom(5 * CHUNK + 10)
    blob = encrypt(data, key, file_id)
    parts = chunks_of(blob)
    # Cut at a chunk boundary, and inside a chunk: what came before decrypts.
    for cut, whole_chunks in ((HEADER_SIZE + len(parts[0]) + len(parts[1]), 2), (len(blob) - 3, 5)):
        got: list[bytes] = []
        with pytest.raises(Truncated) as caught:
            collect(decrypt_chunks(io.BytesIO(blob[:cut]), key, file_id=file_id), got)
        assert b"".join(got) == data[: whole_chunks * CHUNK]
        assert caught.value.plaintext_bytes == whole_chunks * CHUNK
    # A writer that died before close() leaves exactly such a file.
    unfinished = encrypt(data, key, file_id, close=False)
    with pytest.raises(Truncated, match="without its final chunk"):
        decrypt(unfinished, key, file_id)
    with pytest.raises(StoreError, match="not an encrypted videoconsult file"):
        decrypt(b"RIFF" + blob[4:], key, file_id)


def test_what_the_writer_was_told_to_put_on_disk_survives_its_death() -> None:
    key, file_id = new_data_key(), uuid.uuid4()
    sink = io.BytesIO()
    writer = EncryptingWriter(sink, key, file_id, chunk_size=CHUNK)
    writer.write(b"a" * (CHUNK + 10))  # one full chunk out, 10 bytes held
    assert writer.pending_bytes == 10
    writer.write_pending()  # a shorter chunk, as the recorder asks each second
    assert writer.pending_bytes == 0
    writer.write(b"b" * 5)  # then the writer dies with these in memory
    got: list[bytes] = []
    with pytest.raises(Truncated) as caught:
        collect(decrypt_chunks(io.BytesIO(sink.getvalue()), key, file_id=file_id), got)
    assert b"".join(got) == b"a" * (CHUNK + 10)
    assert caught.value.plaintext_bytes == CHUNK + 10
    # Shorter chunks in the middle are authenticated like any other.
    writer.close()
    assert decrypt(sink.getvalue(), key, file_id) == b"a" * (CHUNK + 10) + b"b" * 5
    assert [len(chunk) - 5 - 16 for chunk in chunks_of(sink.getvalue())] == [CHUNK, 10, 5]


def test_an_aborted_writer_leaves_a_file_that_reads_as_truncated() -> None:
    key, file_id = new_data_key(), uuid.uuid4()
    sink = io.BytesIO()
    writer = EncryptingWriter(sink, key, file_id, chunk_size=CHUNK)
    writer.write(b"c" * (2 * CHUNK + 1))
    writer.abort()  # the disk filled up: no final chunk
    assert writer.closed
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"more")
    with pytest.raises(Truncated, match="without its final chunk"):
        decrypt(sink.getvalue(), key, file_id)


def test_no_plaintext_reaches_the_disk(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "recordings")
    key, file_id = new_data_key(), uuid.uuid4()
    marker = b"PLAINTEXT-MEDIA-" * 5000
    writer = EncryptingWriter(
        store.create("x.vcenc"), key, file_id, chunk_size=4096, owns_sink=True
    )
    writer.write(marker)
    writer.close()
    files = list(tmp_path.rglob("*"))
    assert [f.name for f in files if f.is_file()] == ["x.vcenc"]
    stored = (tmp_path / "recordings" / "x.vcenc").read_bytes()
    assert b"PLAINTEXT-MEDIA-" not in stored
    assert oct((tmp_path / "recordings" / "x.vcenc").stat().st_mode & 0o777) == "0o600"
    with store.open("x.vcenc") as source:
        assert b"".join(decrypt_chunks(source, key, file_id=file_id)) == marker


async def test_a_recording_round_trips_and_crypto_shredding_leaves_no_key(
    harness: Harness, tmp_path: Path
) -> None:
    setup = await new_consult(harness)
    consult_id = uuid.UUID(setup.consult_id)
    engine, master = harness.app[DB_ENGINE], harness.app[MASTER_KEY].key
    store = harness.app[FILE_STORE]
    assert store.root == harness.app[DATA_DIR] / "recordings"
    media = os.urandom(300_000)
    async with engine.begin() as conn:
        recording, writer = await start_recording(
            conn, store, master, consult_id, now=harness.clock.now()
        )
    writer.write(media)
    async with engine.begin() as conn:
        await finish_recording(conn, recording.id, writer, now=harness.clock.now())
    async with engine.connect() as conn:
        file_name, data_key = await data_key_of(conn, master, recording.id)
        row = (await conn.execute(sa.select(recordings))).one()
    assert b"".join(plaintext(store, file_name, data_key, recording.id)) == media
    assert (row.status, row.key_id, row.plaintext_bytes) == (
        "complete",
        master_key_id(master),
        len(media),
    )
    assert data_key not in row.wrapped_key  # only wrapped

    # Keep a copy of the file, as a backup or a crash between the steps would.
    kept = tmp_path / "kept.vcenc"
    shutil.copy(store.path(file_name), kept)

    # The consult ended long ago: retention destroys the key, then the file.
    async with engine.begin() as conn:
        await mark_ended(conn, consult_id, now=harness.clock.now())
    harness.clock.advance(timedelta(days=31).total_seconds())
    async with engine.begin() as conn:
        report = await purge(
            conn,
            now=harness.clock.now(),
            defaults=Retention(consult_days=730, recording_days=30, access_log_days=1825),
        )
    assert report.recordings == 1
    assert report.files == [file_name]
    assert store.delete_files(report.files) == 1
    assert not store.path(file_name).exists()
    async with engine.connect() as conn:
        with pytest.raises(NotFound):
            await data_key_of(conn, master, recording.id)
        # No key anywhere in the database opens the kept copy, and the data
        # key itself is nowhere.
        dump = []
        for table in metadata.sorted_tables:
            dump.append(repr((await conn.execute(sa.select(table))).all()))
    assert data_key.hex() not in "".join(dump)
    assert repr(data_key)[2:-1] not in "".join(dump)
    with pytest.raises(NotFound):
        async with engine.connect() as conn:
            await data_key_of(conn, master, recording.id)
    # The consult record itself stays until its own retention.
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(recordings)) == 0
    with pytest.raises(Tampered):
        decrypt_file(kept, new_data_key(), recording.id)


def test_any_byte_range_decrypts_from_the_chunks_that_hold_it() -> None:
    key, file_id = new_data_key(), uuid.uuid4()
    sink = io.BytesIO()
    writer = EncryptingWriter(sink, key, file_id, chunk_size=CHUNK)
    data = os.urandom(7 * CHUNK + 29)
    writer.write(data[:100])
    writer.write_pending()  # a shorter chunk in the middle, as a recording has
    writer.write(data[100:])
    writer.close()
    source = io.BytesIO(sink.getvalue())
    chunk_map = map_chunks(source, file_id=file_id)
    assert chunk_map.complete
    assert chunk_map.plaintext_size == len(data)
    for first, last in ((0, 0), (0, len(data) - 1), (63, 64), (99, 100), (130, 400), (450, 460)):
        got = b"".join(decrypt_range(source, key, chunk_map, first, last))
        assert got == data[first : last + 1], (first, last)
    # A changed byte in a chunk the range needs is found; others are not read.
    damaged = bytearray(sink.getvalue())
    damaged[chunk_map.chunks[3].offset + 2] ^= 1
    with pytest.raises(Tampered, match="chunk 3"):
        b"".join(decrypt_range(io.BytesIO(bytes(damaged)), key, chunk_map, 200, 300))
    assert b"".join(decrypt_range(io.BytesIO(bytes(damaged)), key, chunk_map, 0, 99)) == data[:100]
    # A file cut inside its last chunks maps up to the last whole one.
    cut = map_chunks(io.BytesIO(sink.getvalue()[:-3]), file_id=file_id)
    assert not cut.complete
    assert cut.plaintext_size == len(data) - (len(data) - 100) % CHUNK
    with pytest.raises(Tampered, match="belongs to"):
        map_chunks(io.BytesIO(sink.getvalue()), file_id=uuid.uuid4())


def test_a_file_that_cannot_be_removed_stops_no_other_from_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found in review: the first unlink that failed with anything but "not
    # found" ended the loop, and the rest of a purge's files stayed for good.
    # The refusal is simulated (a permission error for one file: root ignores
    # file modes here).
    store = FileStore(tmp_path)
    names = [f"{uuid.uuid4()}.vcenc" for _ in range(3)]
    for name in names:
        with store.create(name) as sink:
            sink.write(b"ciphertext")
    stuck = store.path(names[0])
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == stuck:
            raise PermissionError(13, "Permission denied")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(OSError, match="1 recording files could not be removed"):
        store.delete_files(names)
    assert [store.path(name).exists() for name in names] == [True, False, False]


def test_a_writer_told_another_files_prefix_never_takes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found in review: the seekable copy of a recording is written under the
    # recording's key with a fresh random prefix; drawn equal to the
    # original's (1 in 2**32), every chunk's nonce would be used twice. The
    # draw is forced to the original's first.
    key, file_id = new_data_key(), uuid.uuid4()
    draws = iter([b"\x01\x02\x03\x04", b"\x01\x02\x03\x04", b"\x09\x09\x09\x09"])
    monkeypatch.setattr("audit.filestore.os.urandom", lambda n: next(draws))
    first = io.BytesIO()
    with EncryptingWriter(first, key, file_id) as writer:
        writer.write(b"media")
    _id, header = read_header(io.BytesIO(first.getvalue()))
    copy = io.BytesIO()
    with EncryptingWriter(copy, key, file_id, avoid_prefix=nonce_prefix(header)) as writer:
        writer.write(b"media")
    _id, copy_header = read_header(io.BytesIO(copy.getvalue()))
    assert nonce_prefix(header) == b"\x01\x02\x03\x04"
    assert nonce_prefix(copy_header) == b"\x09\x09\x09\x09"
