"""When this server was last alive, for the consults it leaves behind when it dies.

A file in the data directory is touched every few seconds (and at a clean
stop). A server killed with its consults running cannot end them; the next
start reads when the file was last touched, and the consults nobody returns
to end at that moment, not at the restart (``Recovery.resume``).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from server.app_keys import DATA_DIR

ALIVE_FILE = "alive"
# How often the file is touched: the most an end time can be early by.
ALIVE_BEAT_S = 2.0


def last_alive(data_dir: Path) -> datetime | None:
    """When the server on this data directory was last alive, if it ever ran."""
    with contextlib.suppress(FileNotFoundError):
        return datetime.fromtimestamp((data_dir / ALIVE_FILE).stat().st_mtime, UTC)
    return None


def touch_alive(data_dir: Path) -> None:
    (data_dir / ALIVE_FILE).touch(mode=0o600)


async def beat(app: web.Application) -> None:
    """The job's round: say this server is alive (one system call)."""
    touch_alive(app[DATA_DIR])
