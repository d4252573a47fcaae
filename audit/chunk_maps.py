"""The chunk maps of recently played recordings, kept (bounded) between requests.

A player asks for a recording's bytes many times per viewing (the start,
the end, each seek), and every answer needs the file's chunk map
(:func:`audit.filestore.map_chunks`): a seek and a 5-byte read per chunk,
some 20,000 of them for an hour of two cameras. :class:`ChunkMapCache`
keeps the maps of the recordings played last, least recently used out
first, bounded by the chunks it holds (a map holds offsets and the file's
header, no key and no plaintext). An entry is used only while the file is
the one it was made from (same inode, size and modification time: a file
replaced by its seekable copy, or grown, is mapped again) and is dropped
when this node deletes its recording, for its owner or in the retention
purge (:meth:`ChunkMapCache.discard`); on other nodes, and after a delete
from the command line, it ages out of the bounded cache (its file is gone,
so it is never used again).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from audit.filestore import ChunkMap, map_chunks
from audit.recordings import FileStore

# A map takes 3.7 MB per hour of two 1.5 Mbit/s cameras (20,592 chunks of
# 64 KiB, measured with tracemalloc): 200,000 chunks are about ten hours of
# consults in 36 MB.
MAX_CACHED_CHUNKS = 200_000


@dataclass(frozen=True)
class _FileIdentity:
    device: int
    inode: int
    size: int
    modified_ns: int

    @classmethod
    def of(cls, descriptor: int) -> _FileIdentity:
        stat = os.fstat(descriptor)
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class ChunkMapCache:
    """Chunk maps by file, least recently used out first (thread-safe)."""

    def __init__(self, *, max_chunks: int = MAX_CACHED_CHUNKS) -> None:
        self._max_chunks = max_chunks
        self._entries: OrderedDict[tuple[str, uuid.UUID], tuple[_FileIdentity, ChunkMap]] = (
            OrderedDict()
        )
        self._chunks = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, store: FileStore, file_name: str, file_id: uuid.UUID) -> ChunkMap:
        """The chunk map of ``file_name`` (whose id must be ``file_id``), from the
        cache when the file is unchanged. Blocking (a stat; on a miss, the
        map): call it in a thread. Raises what :func:`map_chunks` and
        opening the file raise."""
        key = (file_name, file_id)
        with store.open(file_name) as source:
            identity = _FileIdentity.of(source.fileno())
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry[0] == identity:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry[1]
                self.misses += 1
            chunk_map = map_chunks(source, file_id=file_id)
        with self._lock:
            self._remove(key)
            self._entries[key] = (identity, chunk_map)
            self._chunks += len(chunk_map.chunks)
            # The newest stays even when it alone is over the bound.
            while self._chunks > self._max_chunks and len(self._entries) > 1:
                self._remove(next(iter(self._entries)))
        return chunk_map

    def discard(self, file_names: list[str]) -> None:
        """Forget the maps of these files (their recordings were deleted)."""
        with self._lock:
            for key in [key for key in self._entries if key[0] in file_names]:
                self._remove(key)

    def __len__(self) -> int:
        return len(self._entries)

    def _remove(self, key: tuple[str, uuid.UUID]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._chunks -= len(entry[1].chunks)
