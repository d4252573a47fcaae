"""How long a job holds the event loop, against the same machine at rest.

The loop-lag watcher (server/loop_lag.py) sees every hold of the loop,
including the loop's own thread waiting for a core on a busy, shared
machine. So a job's longest hold is compared with the longest seen over as
long a stretch of doing nothing just before: a job that works on the loop
holds it far longer than the machine's own noise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

from server.loop_lag import LoopLag

T = TypeVar("T")
PROBE_S = 0.002


async def longest_hold(job: Awaitable[T]) -> tuple[T, float, float]:
    """Run ``job``; return its result, the longest hold while it ran, and the
    longest over as long a stretch at rest just before it."""
    watcher = LoopLag(warn_after_s=60.0, probe_s=PROBE_S)
    watcher.start()
    try:
        started = time.perf_counter()
        result = await job
        took_s = time.perf_counter() - started
    finally:
        watcher.stop()
    job_s = watcher.window()[0]
    rest = LoopLag(warn_after_s=60.0, probe_s=PROBE_S)
    rest.start()
    try:
        await asyncio.sleep(max(took_s, 0.5))
    finally:
        rest.stop()
    return result, job_s, rest.window()[0]
