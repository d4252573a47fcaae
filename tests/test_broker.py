"""The in-process broker, store and timers on their own."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from signaling.inprocess import InProcessBroker, InProcessRoomStore, InProcessTimers
from signaling.ports import Delivery
from signaling.protocol import ParticipantRole
from signaling.tickets import MAX_TICKETS_PER_INVITE, InProcessTicketStore, TicketGrant


class Recorder:
    def __init__(self) -> None:
        self.got: list[Delivery] = []

    async def deliver(self, delivery: Delivery) -> None:
        self.got.append(delivery)


async def test_deliveries_reach_only_their_consult_and_role() -> None:
    broker = InProcessBroker()
    a, b = uuid.uuid4(), uuid.uuid4()
    a_patient, b_patient, a_therapist = Recorder(), Recorder(), Recorder()
    await broker.subscribe(a, ParticipantRole.PATIENT, a_patient.deliver)
    await broker.subscribe(b, ParticipantRole.PATIENT, b_patient.deliver)
    await broker.subscribe(a, ParticipantRole.THERAPIST, a_therapist.deliver)
    await broker.publish(a, ParticipantRole.PATIENT, Delivery({"to": "a-patient"}))
    assert [d.message for d in a_patient.got] == [{"to": "a-patient"}]
    assert b_patient.got == []
    assert a_therapist.got == []


async def test_a_failing_receiver_does_not_stop_the_others_or_the_sender() -> None:
    broker = InProcessBroker()
    consult = uuid.uuid4()
    healthy = Recorder()

    async def broken(_delivery: Delivery) -> None:
        raise RuntimeError("socket exploded")

    await broker.subscribe(consult, ParticipantRole.PATIENT, broken)
    await broker.subscribe(consult, ParticipantRole.PATIENT, healthy.deliver)
    await broker.publish(consult, ParticipantRole.PATIENT, Delivery({"n": 1}))
    assert [d.message for d in healthy.got] == [{"n": 1}]


async def test_a_closed_subscription_receives_nothing_more() -> None:
    broker = InProcessBroker()
    consult = uuid.uuid4()
    recorder = Recorder()
    subscription = await broker.subscribe(consult, ParticipantRole.PATIENT, recorder.deliver)
    await subscription.close()
    await subscription.close()  # idempotent
    await broker.publish(consult, ParticipantRole.PATIENT, Delivery({"n": 1}))
    assert recorder.got == []


async def test_the_store_does_not_recreate_a_forgotten_room() -> None:
    store = InProcessRoomStore()
    consult = uuid.uuid4()
    async with store.locked(consult, create=True) as state:
        assert state is not None
        state.display_name = "J."
    await store.forget(consult)
    async with store.locked(consult) as state:
        assert state is None
    assert len(store) == 0


async def test_a_peeked_state_never_changes_afterwards() -> None:
    # peek hands out the saved state without copying it; that is only safe
    # because a change under the lock is made on a copy and swapped in.
    store = InProcessRoomStore()
    consult = uuid.uuid4()
    async with store.locked(consult, create=True) as state:
        assert state is not None
        state.display_name = "before"
    seen = await store.peek(consult)
    assert seen is not None
    assert seen.display_name == "before"
    async with store.locked(consult) as state:
        assert state is not None
        state.display_name = "after"
        assert seen.display_name == "before"
    assert seen.display_name == "before"
    now = await store.peek(consult)
    assert now is not None
    assert now.display_name == "after"


async def test_due_timers_are_handed_out_once() -> None:
    timers = InProcessTimers()
    now = datetime(2026, 11, 23, tzinfo=UTC)
    await timers.schedule("a", now, {"x": 1})
    await timers.schedule("b", now + timedelta(seconds=10), {"x": 2})
    assert await timers.claim_due(now) == [("a", {"x": 1})]
    assert await timers.claim_due(now) == []
    assert await timers.claim_due(now + timedelta(seconds=10)) == [("b", {"x": 2})]


async def test_moved_and_cancelled_timers_fire_once_at_their_last_time_or_never() -> None:
    timers = InProcessTimers()
    now = datetime(2026, 11, 23, tzinfo=UTC)
    await timers.schedule("grace", now + timedelta(seconds=30), {"n": 1})
    await timers.schedule("grace", now + timedelta(seconds=60), {"n": 2})  # moved later
    await timers.schedule("max", now + timedelta(seconds=5), {"n": 3})
    await timers.cancel("max")
    await timers.schedule("early", now + timedelta(seconds=1), {"n": 4})
    assert await timers.claim_due(now + timedelta(seconds=45)) == [("early", {"n": 4})]
    assert await timers.claim_due(now + timedelta(seconds=60)) == [("grace", {"n": 2})]
    assert len(timers) == 0
    # Rescheduling one timer again and again keeps a bounded heap and one timer.
    for n in range(1000):
        await timers.schedule("busy", now + timedelta(seconds=n), {"n": n})
    assert len(timers) == 1
    assert len(timers._heap) <= 2 * 1 + 64 + 1
    assert await timers.claim_due(now + timedelta(seconds=2000)) == [("busy", {"n": 999})]


async def test_tickets_expire_are_single_use_and_capped_per_invite() -> None:
    store = InProcessTicketStore()
    now = datetime(2026, 11, 23, tzinfo=UTC)
    grant = TicketGrant(uuid.uuid4(), "hash-a")
    ticket = await store.issue(grant, now=now, ttl_s=60)
    assert await store.claim(ticket, now=now) == grant
    assert await store.claim(ticket, now=now) is None
    expired = await store.issue(grant, now=now, ttl_s=60)
    assert await store.claim(expired, now=now + timedelta(seconds=61)) is None
    many = [await store.issue(grant, now=now, ttl_s=60) for _ in range(20)]
    assert len(store) == MAX_TICKETS_PER_INVITE
    assert await store.claim(many[-1], now=now) == grant
    await store.issue(
        TicketGrant(uuid.uuid4(), "hash-b"), now=now + timedelta(seconds=120), ttl_s=60
    )
    assert len(store) == 1  # the expired ones were swept
