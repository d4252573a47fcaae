"""Requests a minute per client address where no login is needed
(server/client_limits.py): on one node, and shared by two nodes through the
real Redis."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import redis.asyncio as aioredis

from audit.clock import ManualClock
from server.app import create_app
from server.client_limits import WINDOW_S, ClientLimiter, limited_path
from tests.support.settings import SettingsFactory

UNKNOWN_INVITE = "/api/invites/" + "x" * 32


def behind_proxy(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def limited_app(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any, **overrides: Any
) -> Any:
    options = {"security_client_requests_per_min": 5, "server_trusted_proxies": "127.0.0.1"}
    settings = make_settings(**{**options, **overrides})
    return await aiohttp_client(create_app(settings, clock=clock))


def test_only_what_needs_no_login_is_limited() -> None:
    for path in (
        "/api/login",
        "/ws",
        UNKNOWN_INVITE,
        UNKNOWN_INVITE + "/ticket",
        "/api/enrolment/t",
    ):
        assert limited_path(path), path
    for path in ("/api/consults", "/api/session", "/api/logout", "/healthz", "/join/abc", "/"):
        assert not limited_path(path), path


async def test_a_client_past_its_limit_gets_429_and_others_go_on(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any
) -> None:
    client = await limited_app(make_settings, clock, aiohttp_client)
    for _ in range(5):
        response = await client.get(UNKNOWN_INVITE, headers=behind_proxy("203.0.113.7"))
        assert response.status == 404  # counted, and answered as usual
    refused = await client.get(UNKNOWN_INVITE, headers=behind_proxy("203.0.113.7"))
    assert refused.status == 429
    body = await refused.json()
    assert body["error"]["code"] == "too_many_requests"
    assert "try again in" in body["error"]["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= WINDOW_S
    # Login and the socket count against the same limit.
    assert (await client.post("/api/login", headers=behind_proxy("203.0.113.7"))).status == 429
    assert (await client.get("/ws", headers=behind_proxy("203.0.113.7"))).status == 429
    # Another address, and what needs a login, are not held up.
    assert (await client.get(UNKNOWN_INVITE, headers=behind_proxy("198.51.100.2"))).status == 404
    assert (await client.get("/healthz", headers=behind_proxy("203.0.113.7"))).status == 200
    assert (await client.get("/api/session", headers=behind_proxy("203.0.113.7"))).status == 401


async def test_zero_means_no_limit(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any
) -> None:
    client = await limited_app(
        make_settings, clock, aiohttp_client, security_client_requests_per_min=0
    )
    for _ in range(20):
        assert (await client.get(UNKNOWN_INVITE)).status == 404


async def test_the_window_ends_and_the_client_may_go_on() -> None:
    now = [1000.0]
    limiter = ClientLimiter(per_min=2, master_key=secrets.token_bytes(32), now=lambda: now[0])
    assert await limiter.hit("203.0.113.7") is None
    assert await limiter.hit("203.0.113.7") is None
    now[0] += 20
    assert await limiter.hit("203.0.113.7") == pytest.approx(WINDOW_S - 20)
    now[0] += WINDOW_S - 20
    assert await limiter.hit("203.0.113.7") is None


@pytest.mark.redis
async def test_two_nodes_count_one_client_together_without_its_address_in_redis(
    make_settings: SettingsFactory,
    clock: ManualClock,
    aiohttp_client: Any,
    redis_url: str,
    redis_prefix: str,
) -> None:
    nodes = [
        await limited_app(
            make_settings,
            clock,
            aiohttp_client,
            redis_url=redis_url,
            redis_key_prefix=redis_prefix,
        )
        for _ in range(2)
    ]
    statuses = [
        (await nodes[n % 2].get(UNKNOWN_INVITE, headers=behind_proxy("203.0.113.7"))).status
        for n in range(6)
    ]
    # Three on each node: the sixth, on the second node, is one too many.
    assert statuses == [404] * 5 + [429]
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{redis_prefix}:rate:*")]
        assert len(keys) == 1
        assert "203.0.113.7" not in keys[0]
        assert await redis.get(keys[0]) == "6"
        assert 0 < await redis.pttl(keys[0]) <= WINDOW_S * 1000
    finally:
        await redis.aclose()


async def test_with_redis_unreachable_each_node_counts_alone(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any, free_port: int
) -> None:
    client = await limited_app(
        make_settings,
        clock,
        aiohttp_client,
        redis_url=f"redis://127.0.0.1:{free_port}/0",
        redis_connect_timeout_s=0.2,
    )
    statuses = [
        (await client.get(UNKNOWN_INVITE, headers=behind_proxy("203.0.113.7"))).status
        for _ in range(6)
    ]
    assert statuses == [404] * 5 + [429]  # never a 500, and still limited


async def test_a_redis_that_failed_is_asked_again_only_after_a_few_seconds(
    free_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    away = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port}/0", socket_connect_timeout=0.2)
    limiter = ClientLimiter(
        per_min=3, master_key=secrets.token_bytes(32), redis=away, prefix="vc", now=lambda: now[0]
    )
    asked = 0
    script = limiter._hit
    assert script is not None

    async def counted(**arguments: Any) -> Any:
        nonlocal asked
        asked += 1
        return await script(**arguments)

    monkeypatch.setattr(limiter, "_hit", counted)
    try:
        results = [await limiter.hit("203.0.113.7") for _ in range(4)]
        assert results[:3] == [None, None, None]
        assert results[3] is not None  # counted on this node meanwhile
        assert asked == 1  # one failure, then not asked for a while
        now[0] += 5
        await limiter.hit("203.0.113.7")
        assert asked == 2
    finally:
        await away.aclose()
