"""The repair rounds after a loss (Redis lost its data, a node died, a
server restarted): every room put back, several at a time, not one after
another, so that a node with thousands of sockets is whole again within
seconds (signaling/recovery.py)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from audit.consults import get_consult_and_label
from server.app_keys import ROOMS
from signaling import recovery
from signaling.concurrency import each_at_most
from signaling.recovery import REPAIR_CONCURRENCY
from signaling.state import RoomPhase
from tests.support.harness import Harness, Sockets, new_consult, receive


async def test_each_at_most_keeps_the_order_and_the_bound() -> None:
    running = most = 0

    async def work(item: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        # The later items finish first: the order of the results is the items'.
        await asyncio.sleep(0.001 * (10 - item))
        running -= 1
        return item * item

    assert await each_at_most(3, range(10), work) == [item * item for item in range(10)]
    assert most == 3
    assert await each_at_most(3, [], work) == []


async def test_each_at_most_raises_the_first_failure_itself_and_stops_the_rest() -> None:
    started: list[int] = []
    finished: list[int] = []

    async def work(item: int) -> None:
        started.append(item)
        if item == 2:
            raise LookupError("item 2 is not there")
        await asyncio.sleep(0.05)
        finished.append(item)

    with pytest.raises(LookupError, match="item 2 is not there"):
        await each_at_most(4, range(100), work)
    # Items 0, 1 and 3 were running when 2 failed: cancelled, none started after.
    assert started == [0, 1, 2, 3]
    assert finished == []
    with pytest.raises(ValueError, match="at least 1"):
        await each_at_most(0, range(3), work)


async def test_a_failure_leaves_the_caller_not_marked_as_cancelled() -> None:
    # Found in review: on Python 3.11 an asyncio.TaskGroup whose child fails
    # while the body waits cancels the caller and never takes that back; the
    # caller's Task.cancelling() stayed 1, which the background jobs read as
    # "stop as asked": one failed repair round ended the node's job for good.
    async def fails(_item: int) -> int:
        await asyncio.sleep(0.01)
        raise ConnectionResetError("the database went away")

    with pytest.raises(ConnectionResetError):
        await each_at_most(REPAIR_CONCURRENCY, [1, 2], fails)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_a_cancelled_caller_cancels_the_work_running() -> None:
    running: list[int] = []
    cancelled: list[int] = []
    both_running = asyncio.Event()

    async def work(item: int) -> None:
        running.append(item)
        if len(running) == 2:
            both_running.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(item)
            raise

    caller = asyncio.create_task(each_at_most(2, range(5), work))
    await asyncio.wait_for(both_running.wait(), 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert sorted(cancelled) == [0, 1]


@pytest.mark.signaling_backends
async def test_a_repair_round_reads_each_consult_once_and_repairs_rooms_side_by_side(
    harness: Harness, sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every room's state lost at once: one round puts both participants of
    each back and tells each therapist of the waiting patient again. Each
    consult's record is read once for its two participants, and the rooms
    are repaired several at a time, at most ``REPAIR_CONCURRENCY``: before,
    one connection after another, a read each."""
    count = REPAIR_CONCURRENCY + 4
    consult_ids: list[uuid.UUID] = []
    therapists = []
    first = await new_consult(harness)
    invites = [(first.consult_id, first.invite_token)]
    for _ in range(count - 1):
        # More consults of the same therapist, who is logged in.
        response = await harness.post("/api/consults", {})
        assert response.status == 201, await response.text()
        created = await response.json()
        invites.append((created["consult"]["id"], created["invite_token"]))
    for consult, invite_token in invites:
        therapist = await sockets.therapist(consult)
        await receive(therapist, "welcome")
        patient = await sockets.patient(invite_token)
        await receive(patient, "welcome")
        await receive(therapist, "patient-waiting")
        consult_ids.append(uuid.UUID(consult))
        therapists.append(therapist)

    reads: list[uuid.UUID] = []
    reading = most = 0
    real_read = get_consult_and_label

    async def timed_read(conn: Any, consult_id: uuid.UUID) -> Any:
        # The real read, held a moment as under load, so that reads of a
        # round that runs rooms side by side overlap.
        nonlocal reading, most
        reads.append(consult_id)
        reading += 1
        most = max(most, reading)
        try:
            await asyncio.sleep(0.02)
            return await real_read(conn, consult_id)
        finally:
            reading -= 1

    monkeypatch.setattr(recovery, "get_consult_and_label", timed_read)
    rooms = harness.app[ROOMS]
    for consult_id in consult_ids:
        await rooms._store.forget(consult_id)

    assert await rooms.reconcile() == 2 * count
    assert sorted(reads) == sorted(consult_ids)
    assert 1 < most <= REPAIR_CONCURRENCY
    for consult_id, therapist in zip(consult_ids, therapists, strict=True):
        state = await rooms.room_state(consult_id)
        assert state is not None
        assert state.phase is RoomPhase.WAITING
        presences = [state.therapist, state.patient]
        assert [p is not None and p.connected for p in presences] == [True, True]
        await receive(therapist, "patient-waiting")
