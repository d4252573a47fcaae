"""The contract of the Broker, RoomStore and Timers ports, run against both
implementations: in process (one node) and on the real Redis (two nodes).

Each test gets a :class:`Cluster` of two nodes, ``one`` and ``other``: on
Redis, two clients of one Redis, as two server nodes; in process, the same
node twice (on one node, "another node" is this one). What only one
implementation does is in ``tests/test_inprocess.py`` and
``tests/test_redis.py``.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from signaling.inprocess import InProcessBroker, InProcessRoomStore, InProcessTimers
from signaling.ports import Broker, Delivery, RoomStore, Timers
from signaling.protocol import ParticipantRole
from signaling.redis import RedisBroker, RedisRoomStore, RedisTimers
from signaling.state import Presence, RoomPhase, RoomState
from signaling.subscribers import Receivers
from tests.support.deliveries import Recorder
from tests.support.room_marks import mark, mark_of

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@dataclass
class Node:
    """What one server node works with."""

    broker: Broker
    store: RoomStore
    timers: Timers


@dataclass
class Cluster:
    one: Node
    other: Node
    # True when the timers keep nothing (every timer done or cancelled).
    timers_keep_nothing: Callable[[], Awaitable[bool]]


@pytest.fixture(params=["in-process", pytest.param("redis", marks=pytest.mark.redis)])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """Two nodes on one implementation; see the module docstring."""
    if request.param == "redis":
        redis: Cluster = request.getfixturevalue("redis_cluster")
        return redis
    node = Node(InProcessBroker(), InProcessRoomStore(), InProcessTimers())
    timers = node.timers
    assert isinstance(timers, InProcessTimers)

    async def nothing_in_memory() -> bool:
        return len(timers) == 0

    return Cluster(node, node, nothing_in_memory)


@pytest.fixture
async def redis_cluster(redis_url: str, redis_prefix: str) -> AsyncIterator[Cluster]:
    """Two nodes on the real Redis, each with a client of its own."""
    # One client decodes replies and one does not: the implementations take either.
    clients = (
        aioredis.Redis.from_url(redis_url),
        aioredis.Redis.from_url(redis_url, decode_responses=True),
    )
    brokers = [RedisBroker(client, prefix=redis_prefix) for client in clients]
    # Stores without a broker feeding them: every peek reads Redis, so a
    # change on one node is seen at once on the other (a fed store hears it
    # a moment later; tests/test_redis.py tests that).
    stores = [
        RedisRoomStore(client, prefix=redis_prefix, state_ttl=timedelta(hours=1))
        for client in clients
    ]
    timers = [RedisTimers(client, prefix=redis_prefix) for client in clients]

    async def no_timer_keys() -> bool:
        return await clients[0].exists(*timers[0].keys) == 0

    try:
        for broker in brokers:
            await broker.start()
        one, other = (Node(*parts) for parts in zip(brokers, stores, timers, strict=True))
        yield Cluster(one, other, no_timer_keys)
    finally:
        for broker in brokers:
            await broker.close()
        for client in clients:
            await client.aclose()


# The broker.


async def test_deliveries_reach_only_their_consult_and_role(cluster: Cluster) -> None:
    sender, receiver = cluster.one.broker, cluster.other.broker
    a, b = uuid.uuid4(), uuid.uuid4()
    a_patient, b_patient, a_therapist = Recorder(), Recorder(), Recorder()
    await receiver.subscribe(a, ParticipantRole.PATIENT, a_patient.deliver)
    await receiver.subscribe(b, ParticipantRole.PATIENT, b_patient.deliver)
    await receiver.subscribe(a, ParticipantRole.THERAPIST, a_therapist.deliver)
    await sender.publish(a, ParticipantRole.PATIENT, Delivery({"to": "a-patient"}))
    await sender.publish(b, ParticipantRole.PATIENT, Delivery({"to": "b-patient"}))
    assert [d.message for d in await a_patient.wait_for(1)] == [{"to": "a-patient"}]
    assert [d.message for d in await b_patient.wait_for(1)] == [{"to": "b-patient"}]
    assert a_therapist.got == []


async def test_deliveries_from_another_node_arrive_in_order(cluster: Cluster) -> None:
    sender, receiver = cluster.one.broker, cluster.other.broker
    consult = uuid.uuid4()
    recorder = Recorder()
    await receiver.subscribe(consult, ParticipantRole.PATIENT, recorder.deliver)
    for n in range(200):
        await sender.publish(consult, ParticipantRole.PATIENT, Delivery({"n": n}))
    got = await recorder.wait_for(200)
    assert [d.message for d in got] == [{"n": n} for n in range(200)]


async def test_connection_id_close_code_and_text_survive_the_trip(cluster: Cluster) -> None:
    sender, receiver = cluster.one.broker, cluster.other.broker
    consult = uuid.uuid4()
    recorder = Recorder()
    await receiver.subscribe(consult, ParticipantRole.THERAPIST, recorder.deliver)
    replaced = Delivery({"type": "replaced"}, connection_id="conn-7", close_code=4001)
    relayed = Delivery({"type": "answer"}, text='{"type":"answer","sdp":"v=0"}')
    await sender.publish(consult, ParticipantRole.THERAPIST, replaced)
    await sender.publish(consult, ParticipantRole.THERAPIST, relayed)
    assert await recorder.wait_for(2) == [replaced, relayed]


async def test_a_closed_subscription_receives_nothing_more(cluster: Cluster) -> None:
    sender, receiver = cluster.one.broker, cluster.other.broker
    consult = uuid.uuid4()
    closed, still_open = Recorder(), Recorder()
    subscription = await receiver.subscribe(consult, ParticipantRole.PATIENT, closed.deliver)
    await receiver.subscribe(consult, ParticipantRole.PATIENT, still_open.deliver)
    await sender.publish(consult, ParticipantRole.PATIENT, Delivery({"n": 1}))
    await closed.wait_for(1)
    await subscription.close()
    await subscription.close()  # idempotent
    await sender.publish(consult, ParticipantRole.PATIENT, Delivery({"n": 2}))
    # Same channel, dispatched in order: once the open one has the second
    # delivery, the closed one would have had it too.
    await still_open.wait_for(2)
    assert [d.message for d in closed.got] == [{"n": 1}]


async def test_a_failing_receiver_stops_neither_the_others_nor_the_sender(
    cluster: Cluster,
) -> None:
    sender, receiver = cluster.one.broker, cluster.other.broker
    consult = uuid.uuid4()
    healthy = Recorder()

    async def broken(delivery: Delivery) -> None:
        raise RuntimeError(f"socket exploded on {delivery.message}")

    await receiver.subscribe(consult, ParticipantRole.PATIENT, broken)
    await receiver.subscribe(consult, ParticipantRole.PATIENT, healthy.deliver)
    with capture_logs() as logged:
        for n in range(3):
            await sender.publish(
                consult, ParticipantRole.PATIENT, Delivery({"secret": f"symptom-{n}"})
            )
        got = await healthy.wait_for(3)
    assert [d.message["secret"] for d in got] == ["symptom-0", "symptom-1", "symptom-2"]
    failures = [entry for entry in logged if entry["event"] == "delivery failed"]
    assert len(failures) == 3
    # Logged without what the participant said (process logs hold no personal data).
    assert "symptom" not in repr(logged)


def here(broker: Broker, consult: uuid.UUID, role: ParticipantRole) -> Receivers | None:
    """``broker.receivers_now`` for a receiver on the broker's own node."""
    return broker.receivers_now(consult, role, where=getattr(broker, "node_id", ""))


async def never(delivery: Delivery) -> None:
    raise AssertionError("a delivery at once never waits")


async def test_receivers_found_at_once_stay_current_until_a_subscription_comes_or_goes(
    cluster: Cluster,
) -> None:
    # What a relay's route keeps (signaling.relay.Route): the receivers on
    # this node that take a delivery at once, for as long as they are current.
    broker, consult = cluster.one.broker, uuid.uuid4()
    laptop: list[Delivery] = []
    phone: list[Delivery] = []
    first = await broker.subscribe(
        consult, ParticipantRole.PATIENT, never, deliver_now=laptop.append
    )
    receivers = here(broker, consult, ParticipantRole.PATIENT)
    assert receivers is not None
    assert receivers.current
    receivers.deliver(Delivery({"n": 1}))
    assert [d.message for d in laptop] == [{"n": 1}]
    # A second connection of the participant: the receivers found before are not current.
    second = await broker.subscribe(
        consult, ParticipantRole.PATIENT, never, deliver_now=phone.append
    )
    assert not receivers.current
    both = here(broker, consult, ParticipantRole.PATIENT)
    assert both is not None
    assert both.current
    both.deliver(Delivery({"n": 2}))
    assert [d.message for d in laptop] == [{"n": 1}, {"n": 2}]
    assert [d.message for d in phone] == [{"n": 2}]
    # One goes: not current either; found again, the other one alone.
    await first.close()
    assert not both.current
    alone = here(broker, consult, ParticipantRole.PATIENT)
    assert alone is not None
    alone.deliver(Delivery({"n": 3}))
    assert [d.message for d in laptop] == [{"n": 1}, {"n": 2}]
    assert [d.message for d in phone] == [{"n": 2}, {"n": 3}]
    await second.close()
    # A receiver that can only be awaited: nothing at once (publish instead).
    await broker.subscribe(consult, ParticipantRole.THERAPIST, never)
    assert here(broker, consult, ParticipantRole.THERAPIST) is None


async def test_receivers_found_before_a_subscription_closed_do_not_keep_its_receiver(
    cluster: Cluster,
) -> None:
    # A sender's route keeps the receivers it found until its next relay; a
    # sender that stays silent after the other side's socket closed must not
    # keep that socket's outbox (and its connection and buffers) alive.
    broker, consult = cluster.one.broker, uuid.uuid4()

    class Outbox:
        def __init__(self) -> None:
            self.got: list[Delivery] = []

        def deliver_now(self, delivery: Delivery) -> None:
            self.got.append(delivery)

        async def deliver(self, delivery: Delivery) -> None:
            self.got.append(delivery)

    outbox = Outbox()
    subscription = await broker.subscribe(
        consult, ParticipantRole.PATIENT, outbox.deliver, deliver_now=outbox.deliver_now
    )
    receivers = here(broker, consult, ParticipantRole.PATIENT)
    assert receivers is not None
    receivers.deliver(Delivery({"n": 1}))
    assert [d.message for d in outbox.got] == [{"n": 1}]
    gone = weakref.ref(outbox)
    await subscription.close()
    del outbox
    gc.collect()
    assert not receivers.current
    assert gone() is None, "the receivers found before still hold the closed receiver"
    # What is still held delivers nothing (and raises nothing).
    receivers.deliver(Delivery({"n": 2}))


async def test_a_receiver_that_fails_at_once_stops_neither_the_others_nor_the_sender(
    cluster: Cluster,
) -> None:
    broker, consult = cluster.one.broker, uuid.uuid4()
    healthy: list[Delivery] = []

    def broken(delivery: Delivery) -> None:
        raise RuntimeError(f"socket exploded on {delivery.message}")

    await broker.subscribe(consult, ParticipantRole.PATIENT, never, deliver_now=broken)
    await broker.subscribe(consult, ParticipantRole.PATIENT, never, deliver_now=healthy.append)
    receivers = here(broker, consult, ParticipantRole.PATIENT)
    assert receivers is not None
    with capture_logs() as logged:
        receivers.deliver(Delivery({"secret": "symptom"}))
    assert [d.message for d in healthy] == [{"secret": "symptom"}]
    assert [entry["event"] for entry in logged] == ["delivery failed"]
    assert "symptom" not in repr(logged)


async def test_deliveries_published_at_once_all_arrive_each_sender_in_order(
    cluster: Cluster,
) -> None:
    sender, receiver = cluster.one.broker, cluster.other.broker
    consults = [uuid.uuid4() for _ in range(20)]
    recorders = [Recorder() for _ in consults]
    for consult, recorder in zip(consults, recorders, strict=True):
        await receiver.subscribe(consult, ParticipantRole.PATIENT, recorder.deliver)

    async def talk(consult: uuid.UUID) -> None:
        for n in range(25):
            await sender.publish(consult, ParticipantRole.PATIENT, Delivery({"n": n}))

    # 20 senders at once (on Redis, their deliveries share pipelines).
    await asyncio.gather(*(talk(consult) for consult in consults))
    for recorder in recorders:
        got = await recorder.wait_for(25)
        assert [d.message for d in got] == [{"n": n} for n in range(25)]


# The room store.


async def test_a_room_changed_on_one_node_is_seen_on_the_other_until_forgotten(
    cluster: Cluster,
) -> None:
    first, second = cluster.one.store, cluster.other.store
    consult = uuid.uuid4()
    async with first.locked(consult) as missing:
        assert missing is None  # not made without create=True
    assert await second.peek(consult) is None
    async with first.locked(consult, create=True) as state:
        assert state == RoomState()
        assert state is not None
        state.phase = RoomPhase.ACTIVE
        state.therapist = Presence("t-1", node="node-a")
    seen = await second.peek(consult)
    assert seen is not None
    assert (seen.phase, seen.therapist) == (RoomPhase.ACTIVE, Presence("t-1", node="node-a"))
    assert await first.consult_ids() == [consult]
    await second.forget(consult)
    assert await first.peek(consult) is None
    assert await first.consult_ids() == []
    async with first.locked(consult) as state:
        assert state is None  # forgotten, not made again


async def test_a_peeked_state_never_changes_afterwards(cluster: Cluster) -> None:
    # peek may hand out the saved state without copying it; that is only
    # safe because a change under the lock is made on a copy and swapped in.
    store = cluster.one.store
    consult = uuid.uuid4()
    async with store.locked(consult, create=True) as state:
        assert state is not None
        mark(state, "before")
    seen = await store.peek(consult)
    assert seen is not None
    assert mark_of(seen) == "before"
    async with store.locked(consult) as state:
        assert state is not None
        mark(state, "after")
        assert mark_of(seen) == "before"
    assert mark_of(seen) == "before"
    now = await store.peek(consult)
    assert now is not None
    assert mark_of(now) == "after"


async def test_a_change_that_fails_is_not_saved_and_frees_the_lock(cluster: Cluster) -> None:
    first, second = cluster.one.store, cluster.other.store
    consult = uuid.uuid4()
    async with first.locked(consult, create=True) as state:
        assert state is not None
        state.phase = RoomPhase.ACTIVE

    async def change_half_way() -> None:
        async with first.locked(consult) as state:
            assert state is not None
            state.phase = RoomPhase.OVER
            raise RuntimeError("half way")

    with pytest.raises(RuntimeError, match="half way"):
        await change_half_way()
    seen = await second.peek(consult)
    assert seen is not None
    assert seen.phase is RoomPhase.ACTIVE
    async with asyncio.timeout(1):  # the lock was released at once, not left to expire
        async with second.locked(consult) as state:
            assert state is not None


async def test_two_nodes_never_change_one_room_at_the_same_time(cluster: Cluster) -> None:
    first, second = cluster.one.store, cluster.other.store
    consult = uuid.uuid4()
    async with first.locked(consult, create=True) as state:
        assert state is not None
        mark(state, "0")

    async def bump(store: RoomStore) -> None:
        async with store.locked(consult) as state:
            assert state is not None
            value = int(mark_of(state) or "0")
            await asyncio.sleep(0.001)  # a read-modify-write with a gap in it
            mark(state, str(value + 1))

    await asyncio.gather(*(bump(store) for _ in range(20) for store in (first, second)))
    state = await first.peek(consult)
    assert state is not None
    assert mark_of(state) == "40"  # no increment lost


# The timers.


async def test_due_timers_are_handed_out_once(cluster: Cluster) -> None:
    one, other = cluster.one.timers, cluster.other.timers
    await one.schedule("a", NOW, {"x": 1})
    await one.schedule("b", NOW + timedelta(seconds=10), {"x": 2})
    assert await other.claim_due(NOW) == [("a", {"x": 1})]
    assert await one.claim_due(NOW) == []
    assert await other.claim_due(NOW + timedelta(seconds=10)) == [("b", {"x": 2})]


async def test_moved_and_cancelled_timers_fire_once_at_their_last_time_or_never(
    cluster: Cluster,
) -> None:
    one, other = cluster.one.timers, cluster.other.timers
    await one.schedule("grace", NOW + timedelta(seconds=30), {"n": 1})
    await other.schedule("grace", NOW + timedelta(seconds=60), {"n": 2})  # moved later
    await one.schedule("max", NOW + timedelta(seconds=5), {"n": 3})
    await other.cancel("max")
    await other.cancel("never-set")
    await one.schedule("early", NOW + timedelta(seconds=1), {"n": 4})
    await one.schedule("earlier", NOW + timedelta(seconds=90), {"n": 5})
    await one.schedule("earlier", NOW + timedelta(microseconds=1), {"n": 6})  # moved earlier
    assert await other.claim_due(NOW) == []
    assert await other.claim_due(NOW + timedelta(seconds=45)) == [
        ("earlier", {"n": 6}),
        ("early", {"n": 4}),
    ]
    assert await one.claim_due(NOW + timedelta(seconds=60)) == [("grace", {"n": 2})]
    for key in ("earlier", "early", "grace"):
        await other.done(key)
    assert await cluster.timers_keep_nothing()


async def test_a_time_in_another_zone_is_the_same_moment(cluster: Cluster) -> None:
    timers = cluster.one.timers
    amsterdam_winter = timezone(timedelta(hours=1))
    await timers.schedule("t", NOW.astimezone(amsterdam_winter), {})
    assert await timers.claim_due(NOW - timedelta(microseconds=1)) == []
    assert await timers.claim_due(NOW) == [("t", {})]


async def test_a_time_without_a_zone_is_refused(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="no time zone"):
        await cluster.one.timers.schedule("t", datetime(2026, 11, 23, 9, 0), {})


async def test_nodes_claiming_at_once_get_each_timer_exactly_once(cluster: Cluster) -> None:
    one, other = cluster.one.timers, cluster.other.timers
    # Due one millisecond apart, claimed as time advances by the millisecond:
    # both nodes race for the same few timers on every step.
    for n in range(500):
        await one.schedule(f"timer-{n}", NOW + timedelta(milliseconds=n), {"n": n})

    async def claim_as_time_passes(node: Timers) -> list[str]:
        claimed: list[str] = []
        for step in range(510):
            due = await node.claim_due(NOW + timedelta(milliseconds=step))
            claimed.extend(key for key, _payload in due)
        return claimed

    claimers = [claim_as_time_passes(node) for node in (one, other, one, other)]
    results = await asyncio.gather(*claimers)
    everything = [key for result in results for key in result]
    assert len(everything) == 500  # no timer twice
    assert set(everything) == {f"timer-{n}" for n in range(500)}  # none lost
    for key in everything:
        await one.done(key)
    assert await cluster.timers_keep_nothing()
    # Done, so never handed out again, even long after any claim ran out.
    assert await other.claim_due(NOW + timedelta(hours=1)) == []


async def test_a_timer_set_again_or_cancelled_after_its_claim(cluster: Cluster) -> None:
    one, other = cluster.one.timers, cluster.other.timers
    await one.schedule("max", NOW, {"n": 1})
    await one.schedule("grace", NOW, {"n": 2})
    assert len(await one.claim_due(NOW)) == 2
    # Set again while claimed (a retry, a moved deadline): the new one
    # stays, whatever the first claimer's done says.
    await other.schedule("max", NOW + timedelta(seconds=60), {"n": 3})
    await one.done("max")
    # Cancelled while claimed: never handed out again.
    await other.cancel("grace")
    assert await other.claim_due(NOW + timedelta(seconds=45)) == []
    assert await other.claim_due(NOW + timedelta(seconds=60)) == [("max", {"n": 3})]
