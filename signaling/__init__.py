"""The WebSocket signaling protocol, consult rooms and the message broker.

- :mod:`signaling.protocol`: message schemas, parsing and building (pure).
- :mod:`signaling.rooms`: :class:`~signaling.rooms.ConsultRooms`, the waiting
  room, admission, relay, reconnect grace and the end of a consult.
- :mod:`signaling.broker`: the Broker, RoomStore and Timers interfaces and
  their in-process implementations; :mod:`signaling.redis_broker`, the
  Broker and Timers on Redis (not wired into the app yet).
- :mod:`signaling.recording`: consent and the recording's phases per consult;
  :mod:`signaling.recorder`: the server-side recorder (aiortc, PyAV).
- :mod:`signaling.tickets`, :mod:`signaling.turn`, :mod:`signaling.ratelimit`:
  patient tickets, TURN credentials, per-connection rate limits.

Imports ``audit`` and ``config``, never ``server``.
"""

from signaling.rooms import ConsultRooms, Participant, RoomClosed, RoomSettings

__all__ = ["ConsultRooms", "Participant", "RoomClosed", "RoomSettings"]
