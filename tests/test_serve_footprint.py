"""The serving process loads no media library (issues 18 and 19).

Recording runs in recorder worker processes of its own (docs/recording.md);
the process that serves HTTP and the signaling sockets only talks to them.
It has no use for aiortc, PyAV or the codecs under them, which added some
27 MB to its memory and a good part of its start (every restart, every
node). Checked from outside: the shared libraries mapped into a real
``videoconsult serve`` process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from server.app_keys import DATA_DIR
from tests.support.harness import Harness
from tests.support.processes import ServerProcess

# Compiled parts of aiortc and PyAV, and the codec libraries they bring.
MEDIA_LIBRARIES = ("/site-packages/aiortc/", "/site-packages/av/", "/site-packages/av.libs/")


def mapped_libraries(pid: int) -> set[str]:
    """The shared objects mapped into process ``pid``."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if ".so" in line.split()[-1]}


async def test_a_serving_process_maps_no_media_library(
    sqlite_harness: Harness, free_port: int, tmp_path: Path
) -> None:
    await sqlite_harness.client.close()  # the server process runs alone on the data directory
    server = ServerProcess(sqlite_harness.app[DATA_DIR], free_port, tmp_path / "server.log")
    try:
        await asyncio.to_thread(server.wait_healthy)
        libraries = mapped_libraries(server.process.pid)
    finally:
        server.stop()
    media = sorted(path for path in libraries if any(part in path for part in MEDIA_LIBRARIES))
    assert media == [], media
    # The check sees compiled modules of the site-packages at all: aiohttp's.
    assert any("/site-packages/aiohttp/" in path for path in libraries), sorted(libraries)
