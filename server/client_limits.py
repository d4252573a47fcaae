"""Requests a minute per client address on the endpoints that need no login.

Login, enrolment links, invite links, patients' tickets, receipts (the
page and the API) and the signaling socket are what an outsider can reach;
each client address may make ``security.client_requests_per_min`` requests
a minute to them together (fixed one-minute windows), and gets 429 with
``Retry-After`` beyond that.
The lockouts after failed logins (PostgreSQL) stay as they are: this bounds
how fast anyone can try at all, those how often one may fail.

With Redis the count is shared by every node (``{prefix}:rate:{client}``,
an ``INCR`` with the window as its expiry), so spreading requests over
nodes gains nothing. The client part of the key is an HMAC of the address
under a key derived from the master key, so no address is readable in
Redis. When Redis cannot be reached each node counts on its own for the
next few seconds before it asks Redis again: the limit then holds per
node, nobody is refused for Redis's trouble, and a Redis that does not
answer does not hold every login up.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from audit.sealing import derive_key
from server.api.errors import Handler, error_response
from server.app_keys import CLIENT_LIMITER, MASTER_KEY, METRICS, REDIS, SETTINGS
from server.web_security import client_address

__all__ = [
    "WINDOW_S",
    "ClientLimiter",
    "client_limit_middleware",
    "client_limits_context",
    "limited_path",
]

_log = structlog.get_logger("videoconsult.server")

WINDOW_S = 60
# Client addresses counted in memory at most (the oldest windows go first).
_REMEMBERED = 100_000
# The endpoints an outsider can reach without a login.
_LIMITED_PREFIXES = ("/api/enrolment/", "/api/invites/", "/api/receipts/", "/receipt/")
_LIMITED_PATHS = ("/api/login", "/ws")
# After Redis failed to count, how long each node counts on its own before
# it asks Redis again: a Redis that does not answer would otherwise hold
# every login up for the connect timeout.
_REDIS_RETRY_S = 5.0

# KEYS: the client's counter. ARGV: window (ms). Returns the count so far
# in this window and the window's milliseconds left.
_HIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  left = tonumber(ARGV[1])
end
return {count, left}
"""


def limited_path(path: str) -> bool:
    """Whether requests to ``path`` count against the client's limit."""
    return path in _LIMITED_PATHS or path.startswith(_LIMITED_PREFIXES)


class _Windows:
    """Fixed windows per client in this process."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._counts: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def hit(self, client: str) -> tuple[int, float]:
        """Count a request; return the count in the window and its seconds left."""
        now = self._now()
        started, count = self._counts.get(client, (now, 0))
        if now - started >= WINDOW_S:
            started, count = now, 0
        count += 1
        self._counts[client] = (started, count)
        self._counts.move_to_end(client)
        while len(self._counts) > _REMEMBERED:
            self._counts.popitem(last=False)
        return count, WINDOW_S - (now - started)


class ClientLimiter:
    """Counts requests per client address; :meth:`hit` says when to refuse."""

    def __init__(
        self,
        *,
        per_min: int,
        master_key: bytes,
        redis: Redis | None = None,
        prefix: str = "",
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_min = per_min
        self._redis = redis
        self._prefix = prefix
        self._key = derive_key(master_key, "client-rate-limit")
        self._hit = redis.register_script(_HIT) if redis is not None else None
        self._now = now
        self._redis_again_at = 0.0
        self._local = _Windows(now)

    @property
    def enabled(self) -> bool:
        return self._per_min > 0

    def redis_key(self, address: str) -> str:
        digest = hmac.new(self._key, address.encode(), hashlib.sha256).hexdigest()
        return f"{self._prefix}:rate:{digest[:32]}"

    async def hit(self, address: str) -> float | None:
        """Count a request from ``address``: None when it may go ahead,
        otherwise the seconds until its window ends (for Retry-After)."""
        if not self.enabled:
            return None
        count, left_s = await self._count(address)
        return None if count <= self._per_min else max(left_s, 1.0)

    async def _count(self, address: str) -> tuple[int, float]:
        if self._hit is not None and self._now() >= self._redis_again_at:
            try:
                count, left_ms = await self._hit(
                    keys=[self.redis_key(address)], args=[WINDOW_S * 1000]
                )
                return int(count), int(left_ms) / 1000
            except (RedisError, OSError) as err:
                self._redis_again_at = self._now() + _REDIS_RETRY_S
                _log.debug(
                    "client limit counted on this node: Redis unreachable",
                    error=type(err).__name__,
                )
        return self._local.hit(address)


async def client_limits_context(app: web.Application) -> AsyncIterator[None]:
    """The limiter, once the master key and the Redis client are there."""
    settings = app[SETTINGS]
    app[CLIENT_LIMITER] = ClientLimiter(
        per_min=settings.security.client_requests_per_min,
        master_key=app[MASTER_KEY].key,
        redis=app[REDIS],
        prefix=settings.redis.key_prefix,
    )
    yield


@web.middleware
async def client_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """429 with Retry-After for a client past its requests a minute (see the module)."""
    if limited_path(request.path):
        retry_after_s = await request.app[CLIENT_LIMITER].hit(client_address(request))
        if retry_after_s is not None:
            if request.path == "/ws":
                request.app[METRICS].record_refused("too_many_requests")
            seconds = math.ceil(retry_after_s)
            return error_response(
                429,
                "too_many_requests",
                f"too many requests from this address; try again in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )
    return await handler(request)
