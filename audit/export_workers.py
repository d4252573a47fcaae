"""Running an access-log export (audit/export_walk.py) in a worker process.

The worker reads and formats; the caller's event loop only copies the
worker's standard output on, a chunk at a time, so an export of a million
records never holds it (the row conversion and the formatting held it up to
25 ms at a time when they ran in the server: docs/benchmarks.md). The
export's spec, with the database URL and its password, goes through the
worker's stdin, never its command line.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncGenerator
from dataclasses import asdict

import structlog

from audit import export_walk
from audit.errors import DatabaseError
from audit.export_walk import ExportSpec

# How much of the worker's output is copied at a time: a write of this size
# costs the loop a few microseconds, and the pipe holds as much again.
CHUNK_BYTES = 64 * 1024
# The worker writes the class of its error, nothing else (never a value).
_ERROR_CLASS = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,99}")

_log = structlog.get_logger("videoconsult.export")


async def exported_chunks(spec: ExportSpec) -> AsyncGenerator[bytes]:
    """The export's body as the worker writes it; raise :class:`DatabaseError`
    if the worker fails, after the chunks it wrote.

    Closing the generator early (the client went away) kills the worker:
    use it with ``contextlib.aclosing``.
    """
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-P",
        export_walk.__file__,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert worker.stdin is not None
    assert worker.stdout is not None
    assert worker.stderr is not None
    try:
        worker.stdin.write(json.dumps(asdict(spec)).encode())
        worker.stdin.close()
        while chunk := await worker.stdout.read(CHUNK_BYTES):
            yield chunk
        # At most a line: the worker writes nothing else there.
        error = (await worker.stderr.read()).decode(errors="replace").strip()
        status = await worker.wait()
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    if status != 0:
        named = error.splitlines()[-1] if error else ""
        named = named if _ERROR_CLASS.fullmatch(named) else "no error class given"
        _log.warning("access-log export failed", exit_status=status, error=named)
        raise DatabaseError(f"the access-log export failed (exit status {status}): {named}")
