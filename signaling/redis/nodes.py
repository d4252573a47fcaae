"""Which server nodes are alive: :class:`RedisNodes`, heartbeats in Redis."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import cast

from redis.asyncio import Redis

from signaling.redis.codec import as_str, moment_of_score_us, score_us
from signaling.redis.errors import unavailable_on_error

__all__ = ["RedisNodes"]


class RedisNodes:
    """Which server nodes are alive: a sorted set of node ids by the time of
    their last heartbeat, ``{prefix}:nodes``.

    Each node calls :meth:`beat` every few seconds. A node that has not
    beaten for ``dead_after`` is dead; :meth:`claim_dead` hands each dead
    node to exactly one caller (the one whose ``ZREM`` removed it), which
    then starts the grace periods of that node's participants.
    """

    def __init__(self, client: Redis, *, prefix: str, node_id: str, dead_after: timedelta) -> None:
        self._client = client
        self._key = f"{prefix}:nodes"
        self.node_id = node_id
        self._dead_after = dead_after

    @property
    def key(self) -> str:
        return self._key

    async def beat(self, now: datetime) -> bool:
        """Record this node alive at ``now``; True when Redis did not know it
        (the first beat, Redis lost its data, or another node declared this
        one dead meanwhile): the node then tells Redis again who is here."""
        with unavailable_on_error("heartbeat"):
            added = await self._client.zadd(self._key, {self.node_id: score_us(now)})
        return bool(added)

    async def claim_dead(self, now: datetime) -> list[tuple[str, datetime]]:
        """The nodes dead at ``now`` that this caller claimed, with their last heartbeat."""
        with unavailable_on_error("looking for dead nodes"):
            stale = await self._client.zrangebyscore(
                self._key, "-inf", score_us(now - self._dead_after), withscores=True
            )
            claimed: list[tuple[str, datetime]] = []
            for member, score in cast(list[tuple[str | bytes, float]], stale):
                node = as_str(member)
                if node == self.node_id:
                    continue  # this node stalled; its next beat puts it back
                if await self._client.zrem(self._key, member):
                    claimed.append((node, moment_of_score_us(score)))
        return claimed

    async def leave(self) -> None:
        """Off the list (a clean shutdown; its sockets were closed as usual)."""
        with unavailable_on_error("leaving"):
            await self._client.zrem(self._key, self.node_id)
