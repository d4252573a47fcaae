"""Background work: one helper runs every periodic job, logs, counts and backs off."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest
from aiohttp import web
from aiohttp.web_app import CleanupError
from sqlalchemy.exc import IntegrityError, OperationalError
from structlog.testing import capture_logs

from server.background import Job, JobName, JobRunner, run_all
from server.jobs import JOBS
from signaling.concurrency import each_at_most
from signaling.ports import StateUnavailable


class Step:
    """A step that fails with ``errors`` in turn, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self, _app: web.Application) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


def runner(step: Step, failed: list[JobName], **job: object) -> JobRunner:
    return JobRunner(
        Job(JobName.HOUSEKEEPING, step, 1.0, **job),  # type: ignore[arg-type]
        web.Application(),
        failed=failed.append,
    )


async def rounds(job: JobRunner, count: int) -> list[MutableMapping[str, Any]]:
    """Run ``count`` rounds of ``job``; what they logged."""
    with capture_logs() as logs:
        for _ in range(count):
            await job.run_once()
    return logs


def said(logs: list[MutableMapping[str, Any]]) -> list[tuple[str, str]]:
    return [(entry["log_level"], entry["event"]) for entry in logs]


async def test_a_failing_step_is_counted_and_tried_again_after_a_doubling_wait() -> None:
    failed: list[JobName] = []
    job = runner(Step(*(RuntimeError("broke") for _ in range(5))), failed, backoff_max_s=10.0)
    waits = [await job.run_once() for _ in range(6)]
    assert waits == [2.0, 4.0, 8.0, 10.0, 10.0, 1.0]  # capped; back to the interval
    assert failed == [JobName.HOUSEKEEPING] * 5


async def test_a_job_backs_off_no_less_than_its_interval() -> None:
    job = JobRunner(
        Job(JobName.RETENTION, Step(RuntimeError("broke")), 3600.0, backoff_max_s=60.0),
        web.Application(),
        failed=lambda _job: None,
    )
    assert await job.run_once() == 3600.0


async def test_an_unexpected_failure_is_logged_with_its_traceback_each_time() -> None:
    logs = await rounds(runner(Step(RuntimeError("broke"), RuntimeError("again")), []), 3)
    assert said(logs) == [
        ("error", "background job failed; trying again"),
        ("error", "background job failed; trying again"),
        ("info", "background job running again"),
    ]
    assert all(entry["job"] == "housekeeping" for entry in logs)
    assert logs[0]["exc_info"] is True
    assert logs[2]["failures"] == 2


async def test_an_expected_failure_is_said_once_until_the_job_runs_again() -> None:
    failed: list[JobName] = []
    away = StateUnavailable("Redis is unreachable")
    logs = await rounds(runner(Step(away, away, away), failed, expected=(StateUnavailable,)), 4)
    assert said(logs) == [
        ("warning", "background job waits; trying again"),
        ("info", "background job running again"),
    ]
    assert logs[0]["error"] == "StateUnavailable"
    assert len(failed) == 3  # counted each time all the same


async def test_the_database_away_is_expected_of_every_job_said_once_without_a_traceback() -> None:
    """As requests answer 503 (server/outage.py): a PostgreSQL restart is a
    state of the world, not a bug; the fault drill's session check met it
    (tests/test_drills.py) and logged a traceback."""
    failed: list[JobName] = []
    away = OperationalError("SELECT 1", {}, ConnectionRefusedError(111, "Connection refused"))
    logs = await rounds(runner(Step(away, away), failed), 3)
    assert said(logs) == [
        ("warning", "background job waits; trying again"),
        ("info", "background job running again"),
    ]
    assert "exc_info" not in logs[0]
    assert logs[0]["error"] == "OperationalError"
    assert len(failed) == 2
    # A database error that is a bug still comes with its traceback.
    broken = IntegrityError("INSERT", {}, Exception("duplicate key"))
    logs = await rounds(runner(Step(broken), []), 1)
    assert said(logs) == [("error", "background job failed; trying again")]
    assert logs[0]["exc_info"] is True


async def test_the_first_round_waits_one_interval_unless_told_otherwise() -> None:
    assert runner(Step(), []).first_after_s == 1.0
    assert runner(Step(), [], first_after_s=0.0).first_after_s == 0.0


def test_every_job_of_the_application_has_its_own_name() -> None:
    assert sorted(job.name for job in JOBS) == sorted(JobName)


async def test_every_teardown_step_runs_and_a_single_error_is_raised_as_it_is() -> None:
    ran: list[str] = []

    async def fails() -> None:
        ran.append("fails")
        raise OSError("disk")

    async def works() -> None:
        ran.append("works")

    with pytest.raises(OSError, match="disk"):
        await run_all([fails, works])
    assert ran == ["fails", "works"]


async def test_several_teardown_errors_are_raised_together_as_aiohttp_does() -> None:
    async def fails() -> None:
        raise OSError("disk")

    async def also_fails() -> None:
        raise RuntimeError("gone")

    with pytest.raises(CleanupError) as raised:
        await run_all([fails, also_fails])
    assert [type(err) for err in raised.value.exceptions] == [OSError, RuntimeError]


async def test_a_job_stops_when_cancelled_even_if_its_step_swallows_the_cancellation() -> None:
    """A client library that catches CancelledError while it reconnects (seen
    as a harness teardown hanging after a Redis outage) used to leave the job
    asleep for good, and the application's cleanup waiting on it."""
    entered = asyncio.Event()

    async def swallowing(_app: web.Application) -> None:
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return  # what the library did

    job = JobRunner(
        Job(JobName.ROOM_TIMERS, swallowing, 0.01), web.Application(), failed=lambda _name: None
    )
    task = asyncio.create_task(job.run())
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    try:
        assert task.cancelled(), "the job went back to sleep"
    finally:
        task.cancel()  # before the fix, again: it swallows one cancellation per step


async def test_a_job_whose_round_of_room_work_failed_runs_again() -> None:
    # Found in review: a failure inside each_at_most (the rooms' repair, the
    # database away) left the job's task marked as being cancelled (Python
    # 3.11's TaskGroup), and the job took that for a stop: the node never
    # beat, repaired or claimed a dead node again.
    calls = 0

    async def repair(_app: web.Application) -> None:
        nonlocal calls
        calls += 1

        async def fails(_item: int) -> None:
            await asyncio.sleep(0.001)
            raise ConnectionResetError("the database went away")

        await each_at_most(4, [1, 2], fails)

    job = JobRunner(
        Job(JobName.NODE_HEARTBEAT, repair, 0.01), web.Application(), failed=lambda _name: None
    )
    task = asyncio.create_task(job.run())
    try:
        for _ in range(200):
            if calls >= 3 or task.done():
                break
            await asyncio.sleep(0.01)
        assert not task.done(), "the job stopped after a failed round"
        assert calls >= 3
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=2)
