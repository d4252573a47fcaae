"""Periodic background work, in one shape: a :class:`Job` run by :func:`periodic`.

A job is a fixed name, a step and an interval. While the application runs,
the step runs once every interval (the first time after ``first_after_s``).
A step that raises is logged, counted in the failures metric
(``videoconsult_background_failures_total{job}``, docs/metrics.md) and
tried again after a wait that doubles with each failure in a row, up to the
job's ``backoff_max_s``; the first success after failures says so once and
goes back to the interval. Failures the job expects (``expected``, e.g. Redis
away), and the database being away for any job (``audit.db.is_outage``, as
requests answer 503 then), are said once when they start, without a
traceback; any other is logged with its traceback each time. Nothing else in the server writes
``while True: ... except Exception``.

On cleanup the job's task is cancelled and awaited, so that a step
finishes (or rolls back) what it was writing before the resources it uses
close: register a job after those resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.web_app import CleanupError

from audit.db import is_outage
from server.app_keys import METRICS

_log = structlog.get_logger("videoconsult.background")

CleanupContext = Callable[[web.Application], AsyncIterator[None]]
# A number of seconds, or how to read it from the application at start
# (a setting, or a test's override).
Seconds = float | Callable[[web.Application], float]


class JobName(enum.StrEnum):
    """Every periodic job; the value is the ``job`` label of its failures metric."""

    TECHNICAL_LOG = "technical-log"
    HOUSEKEEPING = "housekeeping"
    RETENTION = "retention"
    ROOM_TIMERS = "room-timers"
    SESSION_CHECKS = "session-checks"
    SOCKET_HEARTBEATS = "socket-heartbeats"
    NODE_HEARTBEAT = "node-heartbeat"
    ALIVE = "alive"
    WEBHOOKS = "webhooks"
    WEBHOOK_HISTORY = "webhook-history"


@dataclass(frozen=True)
class Job:
    """What to run, how often, and how patiently after a failure."""

    name: JobName
    # One round of the work; what it returns is ignored.
    step: Callable[[web.Application], Awaitable[object]]
    interval_s: Seconds
    # The first round's delay after start; None: one interval.
    first_after_s: Seconds | None = None
    # The longest wait between failing rounds; never below the interval.
    backoff_max_s: float = 60.0
    # Failures that are a known state of the world rather than a bug.
    expected: tuple[type[Exception], ...] = ()
    # Whether this application runs the job at all (read at start).
    runs_if: Callable[[web.Application], bool] | None = None


def _seconds(value: Seconds, app: web.Application) -> float:
    return value(app) if callable(value) else value


class JobRunner:
    """One job's rounds on one application: runs a step, says how long to wait."""

    def __init__(
        self, job: Job, app: web.Application, *, failed: Callable[[JobName], None]
    ) -> None:
        self.job = job
        self._app = app
        self._failed = failed
        self.interval_s = _seconds(job.interval_s, app)
        first = job.first_after_s
        self.first_after_s = self.interval_s if first is None else _seconds(first, app)
        self.failures_in_a_row = 0

    async def run_once(self) -> float:
        """Run the step once; return the wait before the next round."""
        job = self.job
        try:
            await job.step(self._app)
        except Exception as err:
            self.failures_in_a_row += 1
            self._failed(job.name)
            wait_s = self.retry_in_s()
            if not (isinstance(err, job.expected) or is_outage(err)):
                _log.exception(
                    "background job failed; trying again",
                    job=job.name.value,
                    failures=self.failures_in_a_row,
                    retry_in_s=wait_s,
                )
            elif self.failures_in_a_row == 1:
                _log.warning(
                    "background job waits; trying again",
                    job=job.name.value,
                    error=type(err).__name__,
                )
            return wait_s
        if self.failures_in_a_row:
            _log.info(
                "background job running again", job=job.name.value, failures=self.failures_in_a_row
            )
            self.failures_in_a_row = 0
        return self.interval_s

    def retry_in_s(self) -> float:
        """The wait after the failures so far: the interval, doubled per failure, capped."""
        cap_s = max(self.interval_s, self.job.backoff_max_s)
        # The exponent is capped too: a job failing for days must not overflow.
        return min(cap_s, self.interval_s * 2.0 ** min(self.failures_in_a_row, 32))

    async def run(self) -> None:
        """Run rounds until cancelled."""
        wait_s = self.first_after_s
        task = asyncio.current_task()
        while True:
            await asyncio.sleep(wait_s)
            wait_s = await self.run_once()
            if task is not None and task.cancelling():
                # The step swallowed the cancellation (a client library that
                # catches it while reconnecting): stop as asked, or the
                # application's cleanup waits on this task for good.
                raise asyncio.CancelledError


def periodic(job: Job) -> CleanupContext:
    """Return a ``cleanup_ctx`` entry that runs ``job`` while the application runs."""

    async def _context(app: web.Application) -> AsyncIterator[None]:
        if job.runs_if is not None and not job.runs_if(app):
            yield
            return
        runner = JobRunner(job, app, failed=app[METRICS].record_background_failure)
        task = asyncio.create_task(runner.run(), name=job.name.value)
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return _context


async def run_all(steps: Iterable[Callable[[], Awaitable[object]]]) -> None:
    """Await every teardown step in order, even when some fail; then raise as
    aiohttp's cleanup does: the one error, or a ``CleanupError`` with them all."""
    errors: list[Exception] = []
    for step in steps:
        try:
            await step()
        except Exception as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise CleanupError("Multiple errors on cleanup stage", errors)
