"""The Broker, RoomStore and Timers on Redis, for several server nodes.

Each concept in its own module, all under one key ``prefix``:

- :mod:`~signaling.redis.broker`: :class:`RedisBroker`, deliveries over
  pub/sub, ``{prefix}:room:{consult}:{role}``;
- :mod:`~signaling.redis.rooms`: :class:`RedisRoomStore`, each room's state
  under a lock per room, ``{prefix}:roomstate:{consult}``, its changes
  published on ``{prefix}:room:{consult}:state``;
- :mod:`~signaling.redis.timers`: :class:`RedisTimers`, deadlines claimed
  by one node each, ``{prefix}:timers:*``;
- :mod:`~signaling.redis.nodes`: :class:`RedisNodes`, heartbeats, so that a
  dead node's participants get their grace period from another node,
  ``{prefix}:nodes``;
- :mod:`~signaling.redis.codec`: how deliveries, room states and times are
  written there (pure).

All take a ``redis.asyncio.Redis`` client, with or without
``decode_responses``, and raise :class:`~signaling.ports.StateUnavailable`
(never the client's own errors) when Redis cannot be reached.
"""

from signaling.redis.broker import RedisBroker
from signaling.redis.nodes import RedisNodes
from signaling.redis.rooms import RedisRoomStore
from signaling.redis.timers import RedisTimers

__all__ = ["RedisBroker", "RedisNodes", "RedisRoomStore", "RedisTimers"]
