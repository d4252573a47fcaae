"""What the benchmarks share: paths, the event loop, the host's figures, the report's numbers.

The scripts in this directory import it as ``_common``: run as a script,
a file's own directory comes first on ``sys.path``. That is also why no
script here is named like a package of the project (``audit``,
``signaling``): it would hide that package from the scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg

try:
    import uvloop
except ImportError:  # pragma: no cover - a dependency of the project on Linux
    uvloop = None  # type: ignore[assignment]

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Every script writes its results below here, a directory per invocation.
RESULTS = BENCH / "results"
HOST = "127.0.0.1"  # the only address a benchmark ever talks to
LOOP = "uvloop" if uvloop is not None else "asyncio"
# Exit status of a benchmark stopped by Ctrl+C (128 + SIGINT), as a shell's.
INTERRUPTED = 130

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where there is one, as the server does."""
    if uvloop is not None:
        return uvloop.run(main)
    return asyncio.run(main)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """This process's cycle collector held off while it measures.

    A load generator holding thousands of sockets has a large heap: measured
    on 2026-12-06, its full collections in two admission storm runs took up to
    550 ms each (13, setup included, about 5 during the arrivals), every
    socket it reads and every timer it keeps waiting meanwhile, so the
    servers' latencies measured the generator.
    The garbage is collected before the phase (outside it) and the collector
    runs again after it; reference counting frees almost everything a phase
    allocates meanwhile. Both servers are measured the same way.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cancel_on_signals() -> None:
    """Make Ctrl+C and SIGTERM cancel the running task (a benchmark's main), so
    that its ``finally`` blocks and :func:`run_main`'s cleanup run.

    An exception raised from a signal handler would land in whatever callback
    the event loop runs at that moment, and may be swallowed there.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None, "call it from inside a task"
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)


def run_main(main: Coroutine[Any, Any, int], cleanup: Callable[[], None]) -> int:
    """Run a benchmark's ``main`` to its exit status; ``cleanup`` runs whatever happens.

    Ctrl+C (or a cancelled main) is exit status 130, with a line on stderr.
    """
    try:
        return run_loop(main)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted", file=sys.stderr)
        return INTERRUPTED
    finally:
        cleanup()


async def pg_execute(dsn: str, statement: str) -> None:
    """Run one statement (``CREATE DATABASE``, ``DROP DATABASE``) on a PostgreSQL database."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def client_session() -> aiohttp.ClientSession:
    """The load generator's HTTP and WebSocket client: no connection limit, no cookies kept."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=120),
    )


def raise_fd_limit(want: int) -> int:
    """Raise this process's open-file limit (inherited by the servers it starts)
    to the hard limit, or to ``want`` where there is none; returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, want)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------
# The host and the process, from /proc (Linux).
# --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The host and the load generator, for the results."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": memory_gib(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
        "client_loop": LOOP,
    }


def cpu_jiffies(cpu: int | None = None) -> tuple[int, int]:
    """(busy, total) jiffies of one core, or of the whole host, from /proc/stat."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts[0] == name:
            fields = [int(x) for x in parts[1:]]
            # Guest time is already part of user; idle and iowait are not busy.
            total = sum(fields[:8])
            return total - fields[3] - fields[4], total
    raise RuntimeError(f"/proc/stat has no {name}")


def proc_status_kb(key: str, pid: int | None = None) -> int:
    """A figure of /proc/<pid>/status in KiB (``VmHWM``: the peak RSS); 0 when absent."""
    status = Path("/proc/self/status" if pid is None else f"/proc/{pid}/status")
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def commit(*measured: str) -> str:
    """The checked-out commit, and whether the measured directories differ from it."""

    def git(*argv: str) -> str:
        return subprocess.run(  # noqa: S603 - git, with our own arguments
            ["git", *argv],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if measured and git("status", "--porcelain", "--untracked-files=no", *measured):
        return f"{head} ({' or '.join(f'{d}/' for d in measured)} modified)"
    return head


# --------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------


class Invocation:
    """One invocation's results and its time budget.

    The results go to ``bench/results/<timestamp>-<kind>/`` (``results.json``,
    saved after every phase, and ``summary.md`` at the end), unless ``save``
    is false. What the budget cut is listed under ``results["skipped"]``.
    """

    def __init__(
        self, results: dict[str, Any], *, kind: str, max_minutes: float, save: bool = True
    ) -> None:
        self.results = results
        results.setdefault("skipped", [])
        self.started = time.monotonic()
        self._budget_s = max_minutes * 60
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out_dir = RESULTS / (f"{stamp}-{kind}" if kind else stamp)
        self._saving = save
        if save:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def over_budget(self, what: str) -> bool:
        """Whether the time budget is spent; if it is, ``what`` is listed as skipped."""
        if time.monotonic() - self.started <= self._budget_s:
            return False
        self.results["skipped"].append(what)
        print(f"bench: time budget spent; skipping {what}", flush=True)
        return True

    def save(self) -> None:
        if self._saving:
            text = json.dumps(self.results, indent=2, default=str)
            (self.out_dir / "results.json").write_text(text)

    def finish(self, summary_table: Callable[[dict[str, Any]], str]) -> None:
        """Save the results with the total time, and print and save their summary."""
        minutes = self.results["total_minutes"] = round((time.monotonic() - self.started) / 60, 1)
        self.save()
        table = summary_table(self.results)
        print("\n" + table, flush=True)
        if self._saving:
            (self.out_dir / "summary.md").write_text(table)
            print(f"bench: results in {self.out_dir.relative_to(ROOT)} ({minutes} min)", flush=True)
        else:
            print(f"bench: {minutes} min", flush=True)


def number(value: float) -> str:
    """A figure with as many digits as a table needs."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def cell(values: Sequence[float]) -> str:
    """The median, and the range when there were several runs; ``-`` for none."""
    if not values:
        return "-"
    text = number(statistics.median(values))
    if len(values) > 1 and min(values) != max(values):
        text += f" [{number(min(values))}, {number(max(values))}]"
    return text
