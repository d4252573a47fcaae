"""Which server nodes are alive: :class:`RedisNodes`, heartbeats in Redis."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import cast

from redis.asyncio import Redis

from signaling.redis.codec import as_str
from signaling.redis.errors import unavailable_on_error

__all__ = ["RedisNodes"]

# A heartbeat, scored with Redis's own clock (microseconds since the epoch;
# formatted, as a Lua number would be passed to Redis with 14 digits only).
_BEAT = """
local now = redis.call('TIME')
return redis.call('ZADD', KEYS[1], string.format('%d', now[1] * 1000000 + now[2]), ARGV[1])
"""

# The nodes silent for longer than ARGV[1] microseconds by Redis's clock,
# but not ARGV[2] (the caller), each removed and returned with how long ago
# it last beat: flat, name then age. One script, so each dead node goes to
# exactly one caller.
_CLAIM_DEAD = """
local now = redis.call('TIME')
now = now[1] * 1000000 + now[2]
local before = string.format('%d', now - tonumber(ARGV[1]))
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', before, 'WITHSCORES')
local claimed = {}
for i = 1, #stale, 2 do
  if stale[i] ~= ARGV[2] then
    redis.call('ZREM', KEYS[1], stale[i])
    claimed[#claimed + 1] = stale[i]
    claimed[#claimed + 1] = string.format('%d', now - tonumber(stale[i + 1]))
  end
end
return claimed
"""


class RedisNodes:
    """Which server nodes are alive: a sorted set of node ids by the time of
    their last heartbeat, ``{prefix}:nodes``.

    Each node calls :meth:`beat` every few seconds. A node that has not
    beaten for ``dead_after`` is dead; :meth:`claim_dead` hands each dead
    node to exactly one caller, which then starts the grace periods of that
    node's participants. Both go by Redis's clock (``TIME``), never a
    node's own: a node whose system clock runs ahead must not take the
    others for dead, nor one that runs behind be taken for dead.
    """

    def __init__(self, client: Redis, *, prefix: str, node_id: str, dead_after: timedelta) -> None:
        self._client = client
        self._key = f"{prefix}:nodes"
        self.node_id = node_id
        self._dead_after_us = int(dead_after / timedelta(microseconds=1))
        self._beat = client.register_script(_BEAT)
        self._claim_dead = client.register_script(_CLAIM_DEAD)

    @property
    def key(self) -> str:
        return self._key

    async def beat(self) -> bool:
        """Record this node alive now; True when Redis did not know it (the
        first beat, Redis lost its data, or another node declared this one
        dead meanwhile): the node then tells Redis again who is here."""
        with unavailable_on_error("heartbeat"):
            added = await self._beat(keys=[self._key], args=[self.node_id])
        return bool(added)

    async def claim_dead(self, now: datetime) -> list[tuple[str, datetime]]:
        """The dead nodes this caller claimed, each with its last heartbeat
        on the caller's clock (``now``, less how long ago it was by Redis's)."""
        with unavailable_on_error("looking for dead nodes"):
            found = await self._claim_dead(
                keys=[self._key], args=[self._dead_after_us, self.node_id]
            )
        flat = cast(list[str | bytes], found)
        return [
            (as_str(name), now - timedelta(microseconds=int(as_str(age))))
            for name, age in zip(flat[::2], flat[1::2], strict=True)
        ]

    async def leave(self) -> None:
        """Off the list (a clean shutdown; its sockets were closed as usual)."""
        with unavailable_on_error("leaving"):
            await self._client.zrem(self._key, self.node_id)
