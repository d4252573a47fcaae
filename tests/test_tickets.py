"""Single-use WebSocket tickets: one spec for the in-process store (one node)
and the Redis store (several nodes), the latter against the real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from signaling.tickets import (
    MAX_TICKETS_PER_INVITE,
    InProcessTicketStore,
    RedisTicketStore,
    TicketGrant,
    TicketStore,
)

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
GRANT = TicketGrant(uuid.UUID(int=1), "invite-hash-a")
OTHER = TicketGrant(uuid.UUID(int=2), "invite-hash-b")


@pytest.fixture
async def redis_client(redis_url: str, redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the real Redis; the test's keys go under ``redis_prefix``."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["in-process", "redis"])
def store(request: pytest.FixtureRequest) -> TicketStore:
    """Each behavioural test runs on both stores: they meet one spec."""
    if request.param == "in-process":
        return InProcessTicketStore()
    client: aioredis.Redis = request.getfixturevalue("redis_client")
    prefix: str = request.getfixturevalue("redis_prefix")
    return RedisTicketStore(client, prefix=prefix)


async def stored(client: aioredis.Redis, prefix: str) -> dict[bytes, bytes]:
    """Every key under ``prefix`` with its whole value (a list's entries joined)."""
    found: dict[bytes, bytes] = {}
    async for key in client.scan_iter(match=f"{prefix}:*"):
        kind = await client.type(key)
        if kind == b"string":
            value = await client.get(key)
            assert isinstance(value, bytes)
            found[key] = value
        elif kind == b"list":
            entries = await client.lrange(key, 0, -1)
            assert all(isinstance(entry, bytes) for entry in entries)
            found[key] = b"\n".join(cast(list[bytes], entries))
        else:
            raise AssertionError(f"unexpected {kind!r} at {key!r}")
    return found


async def test_a_ticket_is_good_once(store: TicketStore) -> None:
    ticket = await store.issue(GRANT, now=NOW, ttl_s=60)
    assert await store.claim(ticket, now=NOW) == GRANT
    assert await store.claim(ticket, now=NOW) is None


async def test_a_ticket_is_good_until_its_time_by_the_given_clock(store: TicketStore) -> None:
    in_time = await store.issue(GRANT, now=NOW, ttl_s=60)
    on_the_dot = await store.issue(GRANT, now=NOW, ttl_s=60)
    late = await store.issue(GRANT, now=NOW, ttl_s=60)
    assert await store.claim(in_time, now=NOW + timedelta(seconds=59)) == GRANT
    assert await store.claim(on_the_dot, now=NOW + timedelta(seconds=60)) is None
    assert await store.claim(late, now=NOW + timedelta(seconds=61)) is None
    # Refused late, and gone: it does not come back with an earlier clock.
    assert await store.claim(late, now=NOW) is None


async def test_an_unknown_ticket_gets_nothing(store: TicketStore) -> None:
    await store.issue(GRANT, now=NOW, ttl_s=60)
    assert await store.claim("not-a-ticket", now=NOW) is None
    assert await store.claim("", now=NOW) is None


async def test_tickets_are_all_different(store: TicketStore) -> None:
    tickets = {await store.issue(GRANT, now=NOW, ttl_s=60) for _ in range(3)}
    assert len(tickets) == 3


async def test_the_sixth_ticket_of_an_invite_drops_the_oldest(store: TicketStore) -> None:
    other = await store.issue(OTHER, now=NOW, ttl_s=60)
    tickets = [
        await store.issue(GRANT, now=NOW, ttl_s=60) for _ in range(MAX_TICKETS_PER_INVITE + 1)
    ]
    assert await store.claim(tickets[0], now=NOW) is None
    for ticket in tickets[1:]:
        assert await store.claim(ticket, now=NOW) == GRANT
    # Another invite's ticket, though older than all of them, is untouched.
    assert await store.claim(other, now=NOW) == OTHER


async def test_a_used_ticket_no_longer_counts_towards_the_limit(store: TicketStore) -> None:
    tickets = [await store.issue(GRANT, now=NOW, ttl_s=60) for _ in range(MAX_TICKETS_PER_INVITE)]
    assert await store.claim(tickets[1], now=NOW) == GRANT
    newest = await store.issue(GRANT, now=NOW, ttl_s=60)
    # Five live ones again: the oldest stays.
    for ticket in [tickets[0], *tickets[2:], newest]:
        assert await store.claim(ticket, now=NOW) == GRANT


# The in-process store on its own.


async def test_tickets_expire_are_single_use_and_capped_per_invite() -> None:
    # Expired tickets are swept as new ones are issued: memory stays bounded.
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


async def test_claimed_tickets_leave_nothing_of_their_invites_behind() -> None:
    # Found by the soak (bench/soak.py): every invite whose ticket was used
    # kept an empty entry, for as long as the server ran.
    store = InProcessTicketStore()
    for k in range(100):
        grant = TicketGrant(uuid.uuid4(), f"hash-{k}")
        tickets = [await store.issue(grant, now=NOW, ttl_s=60) for _ in range(2)]
        for ticket in tickets:
            assert await store.claim(ticket, now=NOW) == grant
    assert len(store) == 0
    assert store.invites == 0
    # A ticket claimed too late is gone as well.
    late = await store.issue(GRANT, now=NOW, ttl_s=60)
    assert await store.claim(late, now=NOW + timedelta(seconds=61)) is None
    assert store.invites == 0


# Several nodes on Redis.


async def test_two_nodes_claiming_one_ticket_at_once_get_it_once(
    redis_url: str, redis_prefix: str
) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        node_a, node_b = (RedisTicketStore(client, prefix=redis_prefix) for client in clients)
        for _ in range(20):
            ticket = await node_a.issue(GRANT, now=NOW, ttl_s=60)
            claims = await asyncio.gather(
                node_a.claim(ticket, now=NOW), node_b.claim(ticket, now=NOW)
            )
            assert sorted(claims, key=lambda grant: grant is None) == [GRANT, None]
    finally:
        for client in clients:
            await client.aclose()


async def test_a_ticket_issued_on_one_node_is_claimed_on_another(
    redis_url: str, redis_prefix: str
) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        node_a, node_b = (RedisTicketStore(client, prefix=redis_prefix) for client in clients)
        ticket = await node_a.issue(OTHER, now=NOW, ttl_s=60)
        assert await node_b.claim(ticket, now=NOW) == OTHER
        assert await node_a.claim(ticket, now=NOW) is None
    finally:
        for client in clients:
            await client.aclose()


async def test_two_nodes_issuing_for_one_invite_at_once_keep_the_limit(
    redis_url: str, redis_prefix: str
) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        nodes = [RedisTicketStore(client, prefix=redis_prefix) for client in clients]
        tickets = await asyncio.gather(
            *(nodes[i % 2].issue(GRANT, now=NOW, ttl_s=60) for i in range(20))
        )
        granted = [await nodes[0].claim(ticket, now=NOW) for ticket in tickets]
        assert granted.count(GRANT) == MAX_TICKETS_PER_INVITE
        assert granted.count(None) == 20 - MAX_TICKETS_PER_INVITE
    finally:
        for client in clients:
            await client.aclose()


async def test_redis_holds_no_ticket_and_forgets_them_by_itself(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = RedisTicketStore(redis_client, prefix=redis_prefix)
    tickets = [await store.issue(GRANT, now=NOW, ttl_s=60) for _ in range(3)]
    tickets.append(await store.issue(OTHER, now=NOW, ttl_s=30))
    found = await stored(redis_client, redis_prefix)
    assert len(found) == 4 + 2  # an entry per ticket and a list per invite
    for key, value in found.items():
        for ticket in tickets:
            assert ticket.encode() not in key
            assert ticket.encode() not in value
    for key in found:
        assert 0 < await redis_client.pttl(key) <= 60_000
    # An invite's list lives as long as its longest-lived ticket.
    shorter = await store.issue(GRANT, now=NOW, ttl_s=5)
    assert await redis_client.pttl(f"{redis_prefix}:ticket-invite:{GRANT.invite_hash}") > 5_000
    assert await store.claim(shorter, now=NOW) == GRANT


@pytest.mark.parametrize(
    "garbled",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"consult": "not a uuid", "invite": "h", "until": "2026-11-23T09:01:00+00:00"}',
        b'{"consult": 1, "invite": "h", "until": "2026-11-23T09:01:00+00:00"}',
        b'{"invite": "h", "until": "2026-11-23T09:01:00+00:00"}',
        b'{"consult": "00000000-0000-0000-0000-000000000001", "invite": "", '
        b'"until": "2026-11-23T09:01:00+00:00"}',
        b'{"consult": "00000000-0000-0000-0000-000000000001", "invite": "h", "until": "soon"}',
        b'{"consult": "00000000-0000-0000-0000-000000000001", "invite": "h", '
        b'"until": "2026-11-23T09:01:00"}',
    ],
)
async def test_a_garbled_entry_is_no_ticket_and_is_logged_without_it(
    redis_client: aioredis.Redis, redis_prefix: str, garbled: bytes
) -> None:
    store = RedisTicketStore(redis_client, prefix=redis_prefix)
    ticket = await store.issue(GRANT, now=NOW, ttl_s=60)
    [key] = [key async for key in redis_client.scan_iter(match=f"{redis_prefix}:ticket:*")]
    await redis_client.set(key, garbled, px=60_000)
    with capture_logs() as logs:
        assert await store.claim(ticket, now=NOW) is None
    [entry] = logs
    assert entry["log_level"] == "warning"
    assert entry["error"] in {"ValueError", "TypeError", "KeyError", "JSONDecodeError"}
    logged = repr(entry)
    assert ticket not in logged
    assert key.decode().rsplit(":", 1)[1] not in logged
    assert await redis_client.exists(key) == 0  # and it is gone


async def test_the_valid_entry_beside_the_garbled_ones_is_accepted(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    # The counterpart of the test above: what this module writes, read back.
    store = RedisTicketStore(redis_client, prefix=redis_prefix)
    ticket = await store.issue(GRANT, now=NOW, ttl_s=60)
    [key] = [key async for key in redis_client.scan_iter(match=f"{redis_prefix}:ticket:*")]
    await redis_client.set(
        key,
        b'{"consult": "00000000-0000-0000-0000-000000000001", "invite": "invite-hash-a", '
        b'"until": "2026-11-23T09:01:00+00:00"}',
        px=60_000,
    )
    with capture_logs() as logs:
        assert await store.claim(ticket, now=NOW) == GRANT
    assert logs == []


async def test_a_decoding_client_works_the_same(redis_url: str, redis_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        store = RedisTicketStore(client, prefix=redis_prefix)
        ticket = await store.issue(GRANT, now=NOW, ttl_s=60)
        assert await store.claim(ticket, now=NOW) == GRANT
    finally:
        await client.aclose()


async def test_a_ticket_without_a_lifetime_is_refused(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = RedisTicketStore(redis_client, prefix=redis_prefix)
    with pytest.raises(ValueError, match="ttl_s=0"):
        await store.issue(GRANT, now=NOW, ttl_s=0)


async def test_without_redis_the_client_error_reaches_the_caller() -> None:
    # The callers (the ticket view, the socket's admission) answer it with 503.
    away = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        store = RedisTicketStore(away, prefix="nowhere")
        with pytest.raises(RedisConnectionError):
            await store.issue(GRANT, now=NOW, ttl_s=60)
        with pytest.raises(RedisConnectionError):
            await store.claim("some-ticket", now=NOW)
    finally:
        await away.aclose()
