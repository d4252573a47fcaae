"""What only the in-process Broker, RoomStore and Timers do.

The contract they share with the Redis kind is in tests/test_ports.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from signaling.inprocess import InProcessTimers


async def test_rescheduling_one_timer_again_and_again_keeps_the_heap_bounded() -> None:
    timers = InProcessTimers()
    now = datetime(2026, 11, 23, tzinfo=UTC)
    for n in range(1000):
        await timers.schedule("busy", now + timedelta(seconds=n), {"n": n})
    assert len(timers) == 1
    # Entries of moved timers stay behind until a rebuild; never many.
    assert len(timers._heap) <= 2 * 1 + 64 + 1
    assert await timers.claim_due(now + timedelta(seconds=2000)) == [("busy", {"n": 999})]
    assert len(timers) == 0
