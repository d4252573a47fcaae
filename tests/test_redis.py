"""What only the Redis implementations do, against the real Redis, as two
nodes would use them: the codec, a broker's start and close and Redis
going away, claims that run out, locks that expire, rooms that expire,
changes heard instead of read, node heartbeats.

The contract they share with the in-process kind is in tests/test_ports.py.
Each test works under a prefix of its own (``redis_prefix``, whose keys are
deleted afterwards). Two clients stand for two server nodes: what one
publishes or schedules, the other receives or claims.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from signaling.ports import Delivery, StateUnavailable
from signaling.protocol import ParticipantRole
from signaling.redis import RedisBroker, RedisNodes, RedisRoomStore, RedisTimers
from signaling.redis.codec import (
    decode_delivery,
    encode_room_state,
)
from signaling.state import Presence, RoomPhase
from tests.support.deliveries import WAIT_S, Recorder
from tests.support.room_marks import mark, mark_of, marked

pytestmark = pytest.mark.redis

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


@pytest.fixture
async def nodes(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, ...]]:
    """Two Redis clients, one per pretend node (one decodes replies, one does not).

    Their connections carry a name of this test's own, so that the test that
    drops pub/sub connections drops only these (other test runs share the server)."""
    name = f"vc-test-{secrets.token_hex(6)}"
    first = aioredis.Redis.from_url(redis_url, client_name=name)
    second = aioredis.Redis.from_url(redis_url, decode_responses=True, client_name=name)
    try:
        yield first, second
    finally:
        await first.aclose()
        await second.aclose()


@pytest.fixture
async def brokers(
    nodes: tuple[aioredis.Redis, ...], prefix: str
) -> AsyncIterator[tuple[RedisBroker, RedisBroker]]:
    sender, receiver = (RedisBroker(client, prefix=prefix) for client in nodes)
    await receiver.start()
    try:
        yield sender, receiver
    finally:
        await receiver.close()
        await sender.close()


# The broker.


async def test_a_delivery_that_reaches_nobody_with_redis_away_is_an_error(
    prefix: str,
) -> None:
    away = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    broker = RedisBroker(away, prefix=prefix)
    try:
        consult = uuid.uuid4()
        results = await asyncio.gather(
            *(
                broker.publish(consult, ParticipantRole.PATIENT, Delivery({"n": n}))
                for n in range(5)
            ),
            return_exceptions=True,
        )
        assert all(isinstance(result, StateUnavailable) for result in results), results
        assert all("went nowhere" in str(result) for result in results)
    finally:
        await broker.close()
        await away.aclose()


async def test_subscribing_before_start_is_refused(
    nodes: tuple[aioredis.Redis, ...], prefix: str
) -> None:
    broker = RedisBroker(nodes[0], prefix=prefix)
    with pytest.raises(StateUnavailable, match="not started"):
        await broker.subscribe(uuid.uuid4(), ParticipantRole.PATIENT, Recorder().deliver)
    await broker.close()  # closing a broker never started is fine


async def test_a_closed_broker_can_be_started_again(
    brokers: tuple[RedisBroker, RedisBroker],
) -> None:
    sender, receiver = brokers
    consult = uuid.uuid4()
    recorder = Recorder()
    await receiver.close()
    await receiver.close()  # idempotent
    await receiver.start()
    await receiver.subscribe(consult, ParticipantRole.PATIENT, recorder.deliver)
    await sender.publish(consult, ParticipantRole.PATIENT, Delivery({"n": 1}))
    assert [d.message for d in await recorder.wait_for(1)] == [{"n": 1}]


# The timers.


@pytest.fixture
def timers(nodes: tuple[aioredis.Redis, ...], prefix: str) -> tuple[RedisTimers, RedisTimers]:
    first, second = (RedisTimers(client, prefix=prefix) for client in nodes)
    return first, second


async def test_more_due_timers_than_one_batch_are_all_claimed(
    timers: tuple[RedisTimers, RedisTimers],
) -> None:
    one, other = timers
    for n in range(1200):
        await one.schedule(f"t-{n:04}", NOW, {"n": n})
    claimed = await other.claim_due(NOW)
    assert claimed == [(f"t-{n:04}", {"n": n}) for n in range(1200)]


async def test_a_timer_whose_claimer_died_is_handed_out_again_once(
    timers: tuple[RedisTimers, RedisTimers], nodes: tuple[aioredis.Redis, ...]
) -> None:
    dead, alive = timers
    await dead.schedule("grace", NOW, {"n": 1})
    assert await dead.claim_due(NOW) == [("grace", {"n": 1})]
    # The claimer dies before it is done: nobody else gets it while its
    # claim (30 s) lasts, then exactly one node does, once.
    assert await alive.claim_due(NOW + timedelta(seconds=29)) == []
    assert await alive.claim_due(NOW + timedelta(seconds=31)) == [("grace", {"n": 1})]
    assert await dead.claim_due(NOW + timedelta(seconds=32)) == []
    await alive.done("grace")
    assert await dead.claim_due(NOW + timedelta(hours=1)) == []
    for key in alive.keys:
        assert await nodes[0].exists(key) == 0


# The room store.


def stores(
    nodes: tuple[aioredis.Redis, ...], prefix: str, **options: float
) -> tuple[RedisRoomStore, RedisRoomStore]:
    first, second = (
        RedisRoomStore(client, prefix=prefix, state_ttl=timedelta(hours=1), **options)
        for client in nodes
    )
    return first, second


async def test_a_room_whose_creating_change_failed_is_not_made(
    nodes: tuple[aioredis.Redis, ...], prefix: str
) -> None:
    first, second = stores(nodes, prefix)
    consult = uuid.uuid4()

    async def change_half_way() -> None:
        async with first.locked(consult, create=True) as state:
            assert state is not None
            state.phase = RoomPhase.OVER
            raise RuntimeError("half way")

    with pytest.raises(RuntimeError, match="half way"):
        await change_half_way()
    assert await second.peek(consult) is None
    async with asyncio.timeout(1):  # the lock was released at once, not left to expire
        async with second.locked(consult, create=True) as state:
            assert state is not None


async def test_a_holder_that_outlived_its_lock_saves_nothing(
    nodes: tuple[aioredis.Redis, ...], prefix: str
) -> None:
    slow, fast = stores(nodes, prefix, lock_ttl_s=0.2)
    consult = uuid.uuid4()

    async def stall() -> None:
        async with slow.locked(consult, create=True) as state:
            assert state is not None
            mark(state, "stale")
            await asyncio.sleep(0.3)  # the lock expires; another node moves in
            async with fast.locked(consult, create=True) as newer:
                assert newer is not None
                mark(newer, "newer")

    with pytest.raises(StateUnavailable, match="lock ran out"):
        await stall()
    state = await fast.peek(consult)
    assert state is not None
    assert mark_of(state) == "newer"


async def test_a_room_locked_too_long_is_reported_not_waited_for_forever(
    nodes: tuple[aioredis.Redis, ...], prefix: str
) -> None:
    holder, waiter = stores(nodes, prefix, lock_wait_s=0.2)
    consult = uuid.uuid4()
    async with holder.locked(consult, create=True):
        started = time.monotonic()
        with pytest.raises(StateUnavailable, match="stayed locked"):
            async with waiter.locked(consult, create=True):
                pass
        assert time.monotonic() - started < 1


async def test_room_states_expire_and_a_booked_room_lives_until_its_time(
    nodes: tuple[aioredis.Redis, ...], prefix: str
) -> None:
    store, _other = stores(nodes, prefix)
    plain, booked = uuid.uuid4(), uuid.uuid4()
    async with store.locked(plain, create=True):
        pass
    async with store.locked(booked, create=True) as state:
        assert state is not None
        state.keep_until = datetime.now(UTC) + timedelta(days=7)
    client = nodes[0]
    plain_ttl = await client.pttl(store.state_key(plain))
    booked_ttl = await client.pttl(store.state_key(booked))
    assert 3_500_000 < plain_ttl <= 3_600_000  # state_ttl: an hour
    assert booked_ttl > 7 * 86_400_000  # a week, plus that hour


async def test_while_redis_is_away_peek_answers_from_what_this_node_saw(
    nodes: tuple[aioredis.Redis, ...], prefix: str
) -> None:
    store, _other = stores(nodes, prefix)
    consult, unseen = uuid.uuid4(), uuid.uuid4()
    async with store.locked(consult, create=True) as state:
        assert state is not None
        state.phase = RoomPhase.ACTIVE
    away = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        cut_off = RedisRoomStore(away, prefix=prefix, state_ttl=timedelta(hours=1))
        cut_off._seen = store._seen  # the same node's memory, its Redis gone
        seen = await cut_off.peek(consult)
        assert seen is not None
        assert seen.phase is RoomPhase.ACTIVE
        with pytest.raises(StateUnavailable, match="unreachable"):
            await cut_off.peek(unseen)
        with pytest.raises(StateUnavailable, match="unreachable"):
            async with cut_off.locked(consult):
                pass
    finally:
        await away.aclose()


# Room changes heard over pub/sub: peek answers from memory.


class ReadCounter:
    """Counts the GETs a client sends (a spy: each still goes to Redis)."""

    def __init__(self, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real_get = client.get

        async def counted_get(name: str) -> object:
            self.count += 1
            return await real_get(name)

        monkeypatch.setattr(client, "get", counted_get)


@pytest.fixture
async def fed(
    nodes: tuple[aioredis.Redis, ...], prefix: str
) -> AsyncIterator[list[tuple[RedisBroker, RedisRoomStore]]]:
    """Two nodes, each with a broker feeding its room store."""
    pairs: list[tuple[RedisBroker, RedisRoomStore]] = []
    for client in nodes:
        broker = RedisBroker(client, prefix=prefix)
        store = RedisRoomStore(client, prefix=prefix, state_ttl=timedelta(hours=1))
        broker.watch_rooms(store)
        await broker.start()
        pairs.append((broker, store))
    try:
        yield pairs
    finally:
        for broker, _store in pairs:
            await broker.close()


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` (a peek, which no event announces) until it holds."""
    async with asyncio.timeout(WAIT_S):
        for _ in range(int(WAIT_S / 0.005) + 1):
            if await check():
                return
            await asyncio.sleep(0.005)
    raise AssertionError(f"{check.__name__} did not hold within {WAIT_S} s")


async def test_a_node_hears_room_changes_instead_of_reading_them(
    fed: list[tuple[RedisBroker, RedisRoomStore]],
    nodes: tuple[aioredis.Redis, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (_a, here), (_b, there) = fed
    reads = ReadCounter(nodes[1], monkeypatch)
    consult = uuid.uuid4()
    async with here.locked(consult, create=True) as state:
        assert state is not None
        state.phase = RoomPhase.ACTIVE
        state.therapist = Presence("t-1", node="node-a")
    for _ in range(50):
        seen = await there.peek(consult)
        assert seen is not None
        assert seen.phase is RoomPhase.ACTIVE
    assert reads.count == 1  # read once, then answered from memory
    async with here.locked(consult) as state:
        assert state is not None
        state.patient = Presence("p-1", node="node-a")

    async def patient_seen() -> bool:
        seen = await there.peek(consult)
        return seen is not None and seen.patient == Presence("p-1", node="node-a")

    await until(patient_seen)
    await here.forget(consult)

    async def gone() -> bool:
        return await there.peek(consult) is None

    await until(gone)
    assert reads.count == 1  # both changes were heard, not read


async def test_a_change_is_known_before_a_delivery_sent_after_it(
    fed: list[tuple[RedisBroker, RedisRoomStore]],
) -> None:
    (sender, here), (receiver, there) = fed
    consult = uuid.uuid4()
    async with here.locked(consult, create=True) as state:
        assert state is not None
        mark(state, "-1")
    assert await there.peek(consult) is not None  # remembered from here on
    names: list[str | None] = []
    arrived = Recorder()

    async def deliver(delivery: Delivery) -> None:
        state = await there.peek(consult)
        names.append(mark_of(state))
        await arrived.deliver(delivery)

    await receiver.subscribe(consult, ParticipantRole.PATIENT, deliver)
    for n in range(30):
        async with here.locked(consult) as state:
            assert state is not None
            mark(state, str(n))
        await sender.publish(consult, ParticipantRole.PATIENT, Delivery({"n": n}))
    await arrived.wait_for(30)
    # Each delivery found the change made just before it was sent.
    assert names == [str(n) for n in range(30)]


async def test_versions_grow_even_across_lost_keys_and_an_older_change_loses(
    nodes: tuple[aioredis.Redis, ...], prefix: str
) -> None:
    store, _other = stores(nodes, prefix)
    client, consult = nodes[0], uuid.uuid4()

    async def saved_version(name: str) -> int:
        async with store.locked(consult, create=True) as state:
            assert state is not None
            mark(state, name)
        raw = await client.get(store.state_key(consult))
        assert isinstance(raw, bytes)  # this client does not decode
        return int(raw.split(b" ", 1)[0])

    first = await saved_version("first")
    second = await saved_version("second")
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
    await client.delete(*keys)  # as a Redis restart without persistence would
    third = await saved_version("third")
    assert first < second < third
    # Heard out of order: the older change never replaces the newer.
    store.feed_restarted()
    store.changed(consult, f"{third + 10} " + encode_room_state(marked("new")))
    store.changed(consult, f"{third + 5} " + encode_room_state(marked("old")))
    seen = await store.peek(consult)
    assert seen is not None
    assert mark_of(seen) == "new"
    with pytest.raises(ValueError, match="no version"):
        store.changed(consult, "garbage")


async def test_peek_reads_redis_again_after_a_while_and_after_the_feed_restarted(
    nodes: tuple[aioredis.Redis, ...], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = nodes[0]
    broker = RedisBroker(client, prefix=prefix)
    store = RedisRoomStore(client, prefix=prefix, state_ttl=timedelta(hours=1), fresh_s=0.3)
    broker.watch_rooms(store)
    await broker.start()
    try:
        reads = ReadCounter(client, monkeypatch)
        consult = uuid.uuid4()
        async with store.locked(consult, create=True):
            pass
        assert reads.count == 1  # the read under the lock
        assert await store.peek(consult) is not None
        assert reads.count == 1
        # Expired in Redis, which publishes nothing: unheard, but read again
        # once the remembered state is older than fresh_s.
        await client.delete(store.state_key(consult))
        assert await store.peek(consult) is not None
        await asyncio.sleep(0.35)
        assert await store.peek(consult) is None
        assert reads.count == 2
        assert await store.peek(consult) is None
        assert reads.count == 2
        store.feed_restarted()
        assert await store.peek(consult) is None
        assert reads.count == 3
    finally:
        await broker.close()
    # A closed broker feeds nothing: every peek reads.
    await store.peek(consult)
    await store.peek(consult)
    assert reads.count == 5


async def test_a_feed_that_lost_its_connection_reads_again_and_hears_again(
    fed: list[tuple[RedisBroker, RedisRoomStore]],
    nodes: tuple[aioredis.Redis, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (_a, here), (_b, there) = fed
    consult = uuid.uuid4()
    async with here.locked(consult, create=True):
        pass
    reads = ReadCounter(nodes[1], monkeypatch)
    assert await there.peek(consult) is not None
    assert reads.count == 1
    # Redis drops every pub/sub connection of these nodes (what a restart does to them).
    name = nodes[0].connection_pool.connection_kwargs["client_name"]
    ours = [c for c in await nodes[0].client_list(_type="pubsub") if c["name"] == name]
    assert len(ours) == 2, ours  # one feed per node
    for connection in ours:
        await nodes[0].client_kill_filter(_id=connection["id"])

    async def read_again() -> bool:
        await there.peek(consult)
        return reads.count > 1

    # Within far less than the 5 s a remembered room lasts: the reconnect
    # itself made the node forget what it may have missed.
    started = time.monotonic()
    await until(read_again)
    assert time.monotonic() - started < 4

    async def answered_from_memory_again() -> bool:
        before = reads.count
        await there.peek(consult)
        return reads.count == before

    await until(answered_from_memory_again)  # subscribed again
    async with here.locked(consult) as state:
        assert state is not None
        mark(state, "after the reconnect")

    async def heard() -> bool:
        seen = await there.peek(consult)
        return seen is not None and mark_of(seen) == "after the reconnect"

    count = reads.count
    await until(heard)
    assert reads.count == count


async def subscribed(wire: PubSub, channel: str) -> None:
    """Subscribe ``wire`` and wait until Redis confirms it: ``subscribe`` only
    sends the command, and a PUBLISH from another connection may reach Redis
    first (seen once in CI: the message was never heard)."""
    await wire.subscribe(channel)
    async with asyncio.timeout(WAIT_S):
        while True:
            message = await wire.get_message(timeout=WAIT_S)
            if message is not None and message["type"] == "subscribe":
                confirmed = message["channel"]
                if (confirmed.decode() if isinstance(confirmed, bytes) else confirmed) == channel:
                    return


async def test_a_delivery_to_a_receiver_on_this_node_skips_redis(
    brokers: tuple[RedisBroker, RedisBroker], nodes: tuple[aioredis.Redis, ...], prefix: str
) -> None:
    receiver = brokers[1]
    consult = uuid.uuid4()
    here = Recorder()
    await receiver.subscribe(consult, ParticipantRole.PATIENT, here.deliver)
    wire = nodes[0].pubsub()
    await subscribed(wire, receiver.channel(consult, ParticipantRole.PATIENT))
    try:
        await receiver.publish(
            consult, ParticipantRole.PATIENT, Delivery({"n": 1}), where=receiver.node_id
        )
        await receiver.publish(consult, ParticipantRole.PATIENT, Delivery({"n": 2}), where="other")
        assert [d.message for d in await here.wait_for(2)] == [{"n": 1}, {"n": 2}]
        on_the_wire: list[bytes] = []
        async with asyncio.timeout(WAIT_S):
            while not on_the_wire:
                message = await wire.get_message(timeout=WAIT_S)
                if message is not None and message["type"] == "message":
                    on_the_wire.append(message["data"])
        assert len(on_the_wire) == 1
        assert decode_delivery(on_the_wire[0].decode()).message == {"n": 2}
        # No subscriber here after all (the receiver moved): Redis carries it.
        other = uuid.uuid4()
        await subscribed(wire, receiver.channel(other, ParticipantRole.PATIENT))
        await receiver.publish(
            other, ParticipantRole.PATIENT, Delivery({"n": 3}), where=receiver.node_id
        )
        async with asyncio.timeout(WAIT_S):
            while True:
                message = await wire.get_message(timeout=WAIT_S)
                if message is not None and message["type"] == "message":
                    break
        assert decode_delivery(message["data"].decode()).message == {"n": 3}
    finally:
        await wire.aclose()


# Node heartbeats.


async def test_a_silent_node_is_claimed_dead_by_exactly_one_other(
    nodes: tuple[aioredis.Redis, ...], prefix: str
) -> None:
    after = timedelta(seconds=0.3)
    a, b, c = (
        RedisNodes(client, prefix=prefix, node_id=name, dead_after=after)
        for client, name in ((nodes[0], "a"), (nodes[1], "b"), (nodes[0], "c"))
    )
    assert await a.beat() is True  # new to Redis
    assert await a.beat() is False
    await b.beat()
    await c.beat()
    await asyncio.sleep(0.4)
    await b.beat()
    await c.beat()
    claims = await asyncio.gather(b.claim_dead(NOW), c.claim_dead(NOW))
    ((node, last_seen),) = [claim for found in claims for claim in found]
    # When it last beat, on the claimer's clock: how long ago by Redis's.
    assert node == "a"
    assert NOW - timedelta(seconds=2) < last_seen <= NOW - timedelta(seconds=0.4)
    # The node itself, silent too long, is never its own claim; its next beat
    # puts it back and says so.
    await asyncio.sleep(0.4)
    assert [node for node, _ in await b.claim_dead(NOW)] == ["c"]
    assert await a.beat() is True


async def test_whether_a_node_is_dead_goes_by_redis_clock_not_the_claimers(
    nodes: tuple[aioredis.Redis, ...], prefix: str
) -> None:
    # Found in review: a node whose clock ran ahead took live nodes for dead.
    after = timedelta(seconds=5)
    a, b = (
        RedisNodes(client, prefix=prefix, node_id=name, dead_after=after)
        for client, name in ((nodes[0], "a"), (nodes[1], "b"))
    )
    await a.beat()
    await b.beat()
    assert await b.claim_dead(datetime.now(UTC) + timedelta(hours=1)) == []
    assert await a.claim_dead(datetime.now(UTC) - timedelta(hours=1)) == []
