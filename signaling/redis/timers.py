"""Deadlines in Redis, each claimed by one node: :class:`RedisTimers`.

Keys: a sorted set of timer keys by due time (``{prefix}:timers:due``),
their payloads in a hash (``{prefix}:timers:payloads``), and a sorted set
of claims by when they run out (``{prefix}:timers:claimed``). A Lua script
claims due timers in one step, so each is handed to one node, and again
only if that node never said it was done (it died).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from redis.asyncio import Redis

from signaling.redis.codec import as_str, score_us
from signaling.redis.errors import unavailable_on_error

__all__ = ["RedisTimers"]

_log = structlog.get_logger("videoconsult.signaling")

# Timers claimed per script call: bounds how long one call blocks Redis and
# stays far below Lua's limit on unpack() arguments.
_CLAIM_BATCH = 500

# KEYS: due set, payload hash, claimed set. ARGV: now (µs since the epoch),
# batch size, lease end (µs). Claims the timers due at ``now`` and those
# whose claim ran out (their claimer died before it was done): each moves
# to the claimed set until the lease end, its payload stays until done.
# Returns more, key, payload, key, payload, ...; ``more`` is 1 when a batch
# was full. Atomic, as every script is: two nodes claiming at once never
# see the same timer.
_CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local claimed = {0}
if #due == tonumber(ARGV[2]) or #lapsed == tonumber(ARGV[2]) then
  claimed[1] = 1
end
for _, batch in ipairs({due, lapsed}) do
  if #batch > 0 then
    local payloads = redis.call('HMGET', KEYS[2], unpack(batch))
    for i, key in ipairs(batch) do
      redis.call('ZREM', KEYS[1], key)
      redis.call('ZADD', KEYS[3], ARGV[3], key)
      claimed[#claimed + 1] = key
      claimed[#claimed + 1] = payloads[i] or ''
    end
  end
end
return claimed
"""

# KEYS: claimed set, payload hash. ARGV: key. A timer set again after its
# claim is no longer in the claimed set, and keeps its new payload.
_DONE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 1
"""


class RedisTimers:
    """Deadlines in Redis, each handed out to whichever node claims it first.

    A claim lasts ``lease``: a timer whose claimer has not called
    :meth:`done` by then (the node died while acting on it) is handed out
    again, once. Times must be time-zone aware (a naive time is refused
    with ValueError: its meaning would depend on each node's local zone).
    """

    def __init__(
        self, client: Redis, *, prefix: str, lease: timedelta = timedelta(seconds=30)
    ) -> None:
        self._client = client
        self._due_key = f"{prefix}:timers:due"
        self._payloads_key = f"{prefix}:timers:payloads"
        self._claimed_key = f"{prefix}:timers:claimed"
        self._lease = lease
        self._claim_due = client.register_script(_CLAIM_DUE)
        self._done = client.register_script(_DONE)

    @property
    def keys(self) -> tuple[str, str, str]:
        """The Redis keys this uses (for tests and clean-up)."""
        return (self._due_key, self._payloads_key, self._claimed_key)

    async def schedule(self, key: str, due_at: datetime, payload: dict[str, Any]) -> None:
        score = score_us(due_at)
        encoded = json.dumps(payload, separators=(",", ":"))
        # One transaction: a claim never sees the new time with the old
        # payload, and a timer set again is no longer claimed.
        with unavailable_on_error("setting a timer"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zadd(self._due_key, {key: score})
                pipe.hset(self._payloads_key, key, encoded)
                pipe.zrem(self._claimed_key, key)
                await pipe.execute()

    async def cancel(self, key: str) -> None:
        with unavailable_on_error("cancelling a timer"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(self._due_key, key)
                pipe.zrem(self._claimed_key, key)
                pipe.hdel(self._payloads_key, key)
                await pipe.execute()

    async def claim_due(self, now: datetime) -> list[tuple[str, dict[str, Any]]]:
        score, lease_end = score_us(now), score_us(now + self._lease)
        due: list[tuple[str, dict[str, Any]]] = []
        while True:
            with unavailable_on_error("claiming timers"):
                claimed: list[int | str | bytes] = await self._claim_due(
                    keys=[self._due_key, self._payloads_key, self._claimed_key],
                    args=[score, _CLAIM_BATCH, lease_end],
                )
            more, items = claimed[0] == 1, cast(list[str | bytes], claimed[1:])
            for index in range(0, len(items), 2):
                key, payload = as_str(items[index]), as_str(items[index + 1])
                try:
                    # An empty payload: the hash lost it (never by our own
                    # writes, which are transactions); the key still tells.
                    due.append((key, json.loads(payload) if payload else {}))
                except ValueError:
                    # Handing it out half-read would be worse; done with it.
                    _log.warning("timer with an undecodable payload dropped", timer=key)
                    await self.done(key)
            if not more:
                return due

    async def done(self, key: str) -> None:
        with unavailable_on_error("finishing a timer"):
            await self._done(keys=[self._claimed_key, self._payloads_key], args=[key])
