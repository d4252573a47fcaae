#!/usr/bin/env python3
"""Playback benchmark: the work before a range request's first byte, with and
without the chunk-map cache.

Run from the repository root (see docs/benchmarks.md, "Playback"):

    .venv/bin/python bench/playback.py --minutes 10 60

For each length, an encrypted recording of that many minutes at 3 Mbit/s
(two 1.5 Mbit/s cameras; random bytes, the format does not care) is written
with ``audit.filestore.EncryptingWriter`` into a ``FileStore`` in a new
temp directory (removed afterwards). Then, ``--repeat`` times each, what
``GET /api/recordings/{id}/media`` with ``Range: bytes=N-`` does in its
worker thread before it writes the first byte, seeking to the middle:

- *before*: the chunk map read from the file (``map_chunks``, as every
  request did), the first 64 bytes decrypted (the media type), and the
  first chunk of the range decrypted;
- *after*: the same with the map from ``audit.chunk_maps.ChunkMapCache``
  (a hit: one ``fstat``).

The database write of the access record and HTTP itself are the same in both
and not measured. The file is in the page cache (it was just written): on a
cold disk the map costs more, one read per chunk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import ROOT

sys.path.insert(0, str(ROOT))

from audit.chunk_maps import ChunkMapCache
from audit.filestore import ChunkMap, EncryptingWriter, decrypt_range, map_chunks, new_data_key
from audit.recordings import FileStore

BYTES_PER_MINUTE = 3_000_000 // 8 * 60


def _first_byte(store: FileStore, name: str, key: bytes, chunk_map: ChunkMap) -> None:
    with store.open(name) as source:
        head = b"".join(decrypt_range(source, key, chunk_map, 0, 63))
        middle = chunk_map.plaintext_size // 2
        piece = next(decrypt_range(source, key, chunk_map, middle, chunk_map.plaintext_size - 1))
    assert head
    assert piece


def measure(minutes: float, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="vc-bench-playback-") as directory:
        store = FileStore(Path(directory))
        file_id, key = uuid.uuid4(), new_data_key()
        name = f"{file_id}.vcenc"
        block = os.urandom(1 << 20)
        with store.create(name) as sink, EncryptingWriter(sink, key, file_id) as writer:
            for _ in range(int(minutes * BYTES_PER_MINUTE) >> 20):
                writer.write(block)
        size_mb = store.path(name).stat().st_size / 1e6
        before: list[float] = []
        for _ in range(repeat):
            began = time.perf_counter()
            with store.open(name) as source:
                chunk_map = map_chunks(source, file_id=file_id)
            _first_byte(store, name, key, chunk_map)
            before.append(time.perf_counter() - began)
        cache = ChunkMapCache()
        cache.get(store, name, file_id)  # the first request of a viewing maps it
        after: list[float] = []
        for _ in range(repeat):
            began = time.perf_counter()
            chunk_map = cache.get(store, name, file_id)
            _first_byte(store, name, key, chunk_map)
            after.append(time.perf_counter() - began)
        return {
            "size_mb": size_mb,
            "chunks": len(chunk_map.chunks),
            "before_ms": statistics.median(before) * 1000,
            "before_max_ms": max(before) * 1000,
            "after_ms": statistics.median(after) * 1000,
            "after_max_ms": max(after) * 1000,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print("minutes  file MB  chunks  before: median (max) ms  after: median (max) ms")
    for minutes in args.minutes:
        row = measure(minutes, args.repeat)
        print(
            f"{minutes:7g}  {row['size_mb']:7.0f}  {row['chunks']:6d}  "
            f"{row['before_ms']:10.1f} ({row['before_max_ms']:.1f})"
            f"  {row['after_ms']:12.2f} ({row['after_max_ms']:.2f})"
        )


if __name__ == "__main__":
    main()
