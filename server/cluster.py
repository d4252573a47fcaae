"""This node's parts of the shared state of several nodes, on Redis.

Made at start-up by ``signaling_context`` when Redis is configured; the
node job (:mod:`server.jobs`) beats with them, and they are closed at
tear-down. Without Redis there is no :class:`Cluster`: one node keeps
everything in its own memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import structlog
from redis.asyncio import Redis

from server.background import run_all
from signaling.ports import StateUnavailable
from signaling.redis import RedisBroker, RedisNodes, RedisRoomStore, RedisTimers
from signaling.tickets import RedisTicketStore

_log = structlog.get_logger("videoconsult.server")

# Each node's heartbeat; a node silent for NODE_DEAD_AFTER_S is dead, and its
# participants' grace periods start (well inside consults.grace_s, 30 s).
NODE_BEAT_S = 1.0
NODE_DEAD_AFTER_S = 5.0


@dataclass
class Cluster:
    """The Redis parts of one node, each named for what it holds."""

    node_id: str
    # Deliveries between the nodes' sockets (pub/sub).
    broker: RedisBroker
    # Which nodes are alive (heartbeats).
    nodes: RedisNodes
    # Each consult room's state.
    rooms: RedisRoomStore
    # Grace periods, maximum durations, rooms to forget.
    timers: RedisTimers
    # Single-use WebSocket tickets for patients.
    tickets: RedisTicketStore
    # Set while Redis cannot be reached, or did not know this node: once it
    # answers again, this node tells it again who is connected here (it may
    # have lost its data); cleared when that repair succeeds.
    out_of_touch: bool = False

    @classmethod
    def on(cls, client: Redis, *, prefix: str, node_id: str, state_ttl: timedelta) -> Cluster:
        """The parts of node ``node_id`` on ``client``, under the key ``prefix``."""
        broker = RedisBroker(client, prefix=prefix, node_id=node_id)
        rooms = RedisRoomStore(client, prefix=prefix, state_ttl=state_ttl)
        broker.watch_rooms(rooms)
        return cls(
            node_id=node_id,
            broker=broker,
            nodes=RedisNodes(
                client,
                prefix=prefix,
                node_id=node_id,
                dead_after=timedelta(seconds=NODE_DEAD_AFTER_S),
            ),
            rooms=rooms,
            timers=RedisTimers(client, prefix=prefix),
            tickets=RedisTicketStore(client, prefix=prefix),
        )

    async def close(self) -> None:
        """Stop listening and leave the list of live nodes; both run even
        when the first fails (see :func:`~server.background.run_all`)."""
        await run_all([self.broker.close, self._leave])

    async def _leave(self) -> None:
        try:
            await self.nodes.leave()
        except StateUnavailable as err:
            # Not an error of this node: the others take it for dead instead.
            _log.warning(
                "left without telling Redis; the other nodes notice in seconds",
                error=type(err).__name__,
            )
