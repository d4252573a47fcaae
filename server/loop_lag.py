"""How long this node's event loop is held, measured from a thread beside it.

The loop is for signaling: anything that holds it (a bulk query's row
conversion, hashing, compression) delays every socket of the node. A
watcher thread asks the loop, :data:`PROBE_S` after its last answer, to run a callback that
does nothing but say it ran (``call_soon_threadsafe``) and measures how long
that took: the loop's lag, how long whatever ran before held it. The lags
go to ``/metrics`` (a histogram, and the most and the 99th percentile of the
last minute: docs/metrics.md).

When the loop has not answered within the threshold
(``logging.loop_stall_warning_ms``), the watcher logs one warning once the
loop answers, with the stall's length and where the loop was held: code
locations (file, line, function) only, never a value, so no personal data
reaches the process log.
While a question waits longer than a pause it looks, every pause, at which
callback the loop runs: when several ran and none for half the threshold, no
callback held the loop but there was more work than time (an overload), and
the warning says the loop was busy, naming no code; otherwise it names where
the longest-running callback was, and that callback. It holds no callback's
frame once it returned.
"""

from __future__ import annotations

import asyncio
import functools
import math
import sys
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Iterator
from itertools import accumulate
from pathlib import Path, PurePath
from types import CodeType, FrameType

import structlog
from aiohttp import web
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric

from server.app_keys import METRICS, SETTINGS

_log = structlog.get_logger("videoconsult.loop")

# The pause between an answer and the next question: 50 callbacks a second
# cost next to nothing. A hold may start in the pause, so the probe asked
# during it sees it short by up to this much.
PROBE_S = 0.02
# An overload that goes on is said busy at most this often (the rest counted).
BUSY_EVERY_S = 10.0
# The window of the "most" and "p99" gauges.
WINDOW_S = 60.0
LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Frames of the held loop's stack named in the warning, innermost last.
STACK_FRAMES = 8
_ROOT = Path(__file__).resolve().parent.parent


class _Probe:
    """The watcher's question to the loop: answered when the loop runs it as a
    callback, noting how deep the loop's own frames are there (a callback's
    frames begin below them) and the code of the innermost of them."""

    __slots__ = ("answered", "at", "caller", "depth")

    def __init__(self) -> None:
        self.answered = threading.Event()
        # When the loop ran it: the watcher's own wait for the interpreter's
        # lock afterwards (a switch interval, if the loop goes on working)
        # is no part of the loop's lag.
        self.at = 0.0
        self.depth = 0
        self.caller: CodeType | None = None

    def __call__(self) -> None:
        self.at = time.perf_counter()
        caller: FrameType | None = sys._getframe(1)
        assert caller is not None
        self.caller = caller.f_code
        depth = 0
        while caller is not None:
            depth += 1
            caller = caller.f_back
        self.depth = depth
        self.answered.set()

    def callback_of(self, frame: FrameType | None) -> FrameType | None:
        """The outermost frame of the callback the loop's thread runs in
        ``frame`` (its innermost); None when it runs none (it waits for I/O)."""
        frames = []
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
        frames.reverse()
        if len(frames) <= self.depth or frames[self.depth - 1].f_code is not self.caller:
            return None
        return frames[self.depth]


class _Runs:
    """The callbacks the loop's thread was seen running, sample after sample,
    while a question waited: how long the longest ran (from its first sample
    to its last), where it was then, and how many there were. Only the
    callback of the last sample is held (to know it again by its frame
    object, which is not reused while held): none is kept once it returned."""

    __slots__ = ("count", "current", "longest_s", "since", "where", "where_now")

    def __init__(self) -> None:
        self.current: FrameType | None = None
        self.since = 0.0
        self.where_now: list[str] = []
        self.longest_s = -1.0
        self.where: list[str] = []
        self.count = 0

    def sample(self, callback: FrameType | None, frame: FrameType | None, at: float) -> None:
        if callback is None:
            self.current = None
            return
        if callback is not self.current:
            self.current, self.since, self.count = callback, at, self.count + 1
            self.where_now = _where(frame, callback)
        if at - self.since > self.longest_s:
            self.longest_s, self.where = at - self.since, self.where_now


def _where(frame: FrameType | None, callback: FrameType | None = None) -> list[str]:
    """Where the loop's thread is in ``frame``: ``file:line function``,
    innermost last; at most :data:`STACK_FRAMES`, the first of them
    ``callback``'s own frame where the innermost ones do not reach it.

    From the frames' code alone: no source line is looked up and no file
    is asked about (traceback's helpers stat cached source files), since a
    system call hands the interpreter's lock to the busy loop for a switch
    interval, and reading the loop's cache from this thread is not safe."""
    frames: list[FrameType] = []
    while frame is not None and len(frames) < STACK_FRAMES:
        frames.append(frame)
        frame = frame.f_back
    if callback is not None and frame is not None and all(f is not callback for f in frames):
        frames[-1] = callback  # the callback, then the innermost frames below it
    return [
        f"{_short(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name}" for f in reversed(frames)
    ]


class LoopLag:
    """The watcher of one event loop: start it on the loop, stop it before the loop closes."""

    def __init__(
        self, *, warn_after_s: float, probe_s: float = PROBE_S, busy_every_s: float = BUSY_EVERY_S
    ) -> None:
        self.warn_after_s = warn_after_s
        self._probe_s = probe_s
        # "busy" is said at most this often: the busy stalls meanwhile are
        # counted (how many, the most lag) and said with the next.
        self._busy_every_s = busy_every_s
        self._busy_said_at = -math.inf
        self._unsaid = 0
        self._unsaid_most_s = 0.0
        self._lock = threading.Lock()
        # One count per bucket, not cumulative; the last is +Inf.
        self._buckets = [0] * (len(LAG_BUCKETS_S) + 1)
        self._sum_s = 0.0
        self._recent: deque[tuple[float, float]] = deque()  # (when, lag)
        self.stalls = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id = 0
        self._first = _Probe()

    def start(self) -> None:
        """Watch the running loop (call this on it)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        # Answered once the loop turns: where its own frames end is known
        # before the first question is asked.
        self._loop.call_soon(self._first)
        self._thread = threading.Thread(target=self._watch, name="loop-lag", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        assert self._loop is not None
        # Where the loop's own frames end, from the last answer (the first
        # question is asked by start(), on the loop).
        machinery = self._first
        while not self._stopping.wait(self._probe_s):
            probe = _Probe()
            asked = time.perf_counter()
            try:
                self._loop.call_soon_threadsafe(probe)
            except RuntimeError:
                return  # the loop is closed
            # Where the loop's thread was at the last sample that found it
            # running no callback (waiting for I/O, or in C code of its own).
            where: list[str] = []
            runs = _Runs()
            pause = min(self._probe_s, self.warn_after_s / 4)
            if not probe.answered.wait(pause):
                # Slow to answer: from here on, which callback runs.
                while True:
                    frame = self._loop_frame()
                    at = time.perf_counter()
                    callback = None
                    if machinery.answered.is_set():
                        callback = machinery.callback_of(frame)
                    runs.sample(callback, frame, at)
                    if callback is None:
                        where = _where(frame)
                    del frame, callback
                    if probe.answered.wait(pause):
                        break
                    if self._stopping.is_set() or self._loop.is_closed():
                        return
            runs.current = None
            lag = probe.at - asked
            machinery = probe
            self._record(lag)
            if lag < self.warn_after_s:
                continue
            self.stalls += 1
            threshold_ms = round(self.warn_after_s * 1000)
            if runs.count > 1 and runs.longest_s + pause < self.warn_after_s / 2:
                # Callback after callback, none of them long: more work than
                # the loop's thread has time for. No code is named: whichever
                # ran at a sample is not the cause.
                self._busy(lag, threshold_ms, runs.count)
                continue
            # One callback ran for half the threshold or more (named where it
            # was when first seen), or none ran (the loop waited for I/O and
            # the process got no CPU: named where the loop waits).
            _log.warning(
                "event loop held",
                held_ms=round(lag * 1000, 1),
                threshold_ms=threshold_ms,
                where=runs.where if runs.count else where,
            )

    def _busy(self, lag: float, threshold_ms: int, callbacks_seen: int) -> None:
        now = time.monotonic()
        if now - self._busy_said_at < self._busy_every_s:
            self._unsaid += 1
            self._unsaid_most_s = max(self._unsaid_most_s, lag)
            return
        unsaid: dict[str, float] = {}
        if self._unsaid:
            unsaid = {
                "unsaid": self._unsaid,
                "unsaid_most_lag_ms": round(self._unsaid_most_s * 1000, 1),
            }
        self._busy_said_at, self._unsaid, self._unsaid_most_s = now, 0, 0.0
        _log.warning(
            "event loop busy",
            lag_ms=round(lag * 1000, 1),
            threshold_ms=threshold_ms,
            callbacks_seen=callbacks_seen,
            **unsaid,
        )

    def _loop_frame(self) -> FrameType | None:
        return sys._current_frames().get(self._loop_thread_id)

    def _record(self, lag: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._buckets[bisect_left(LAG_BUCKETS_S, lag)] += 1
            self._sum_s += lag
            self._recent.append((now, lag))
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()

    def window(self) -> tuple[float, float]:
        """The most and the 99th percentile of the lags of the last minute (0 if none)."""
        with self._lock:
            lags = sorted(lag for _when, lag in self._recent)
        if not lags:
            return 0.0, 0.0
        # The nearest rank: of 100 lags the 99th, of 1,000 the 990th.
        return lags[-1], lags[max(0, math.ceil(len(lags) * 0.99) - 1)]

    def families(self) -> Iterator[Metric]:
        with self._lock:
            cumulative = list(accumulate(self._buckets))
            sum_s = self._sum_s
        most, p99 = self.window()
        yield from _families(cumulative, sum_s, most, p99)


def empty_families() -> Iterator[Metric]:
    """The families :meth:`LoopLag.families` yields, empty (for a registry's ``describe``)."""
    yield from _families([0] * (len(LAG_BUCKETS_S) + 1), 0.0, 0.0, 0.0)


def _families(cumulative: list[int], sum_s: float, most: float, p99: float) -> Iterator[Metric]:
    bounds = [*(repr(bound) for bound in LAG_BUCKETS_S), "+Inf"]
    yield HistogramMetricFamily(
        "videoconsult_event_loop_lag_seconds",
        "How long the event loop took to run a callback asked of it 20 ms after the last: "
        "how long other work held it.",
        buckets=list(zip(bounds, cumulative, strict=True)),
        sum_value=sum_s,
    )
    yield GaugeMetricFamily(
        "videoconsult_event_loop_lag_max_seconds",
        "The event loop's longest lag in the last minute.",
        value=most,
    )
    yield GaugeMetricFamily(
        "videoconsult_event_loop_lag_p99_seconds",
        "The 99th percentile of the event loop's lag in the last minute.",
        value=p99,
    )


@functools.lru_cache(maxsize=1024)
def _short(filename: str) -> str:
    """A path inside the project relative to it; a library's from its package
    on. From the name alone: a system call here gives the interpreter's lock
    back to the busy loop for a switch interval (see _Runs)."""
    path = PurePath(filename)
    if path.is_relative_to(_ROOT):
        return str(path.relative_to(_ROOT))
    parts = path.parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    return path.name


async def loop_lag_context(app: web.Application) -> AsyncIterator[None]:
    """Watch the loop for the application's whole life; its figures go to /metrics."""
    watcher = LoopLag(warn_after_s=app[SETTINGS].logging.loop_stall_warning_ms / 1000)
    watcher.start()
    app[METRICS].loop_lag = watcher
    try:
        yield
    finally:
        app[METRICS].loop_lag = None
        await asyncio.to_thread(watcher.stop)
