"""The WebSocket signaling protocol, consult rooms and the message broker.

- :mod:`signaling.protocol`: message schemas, parsing and building (pure).
- :mod:`signaling.rooms`: :class:`~signaling.rooms.ConsultRooms`, the waiting
  room, admission, relay, reconnect grace and the end of a consult; its
  deadlines (grace periods, maximum duration) fire in :mod:`signaling.deadlines`,
  repairs after a failure (a dead node, Redis away) are made in
  :mod:`signaling.recovery`, and each change runs to its end
  (:mod:`signaling.changes`) even when the socket that asked for it goes.
- :mod:`signaling.state`: what a room knows (its phases, who is connected
  where) and who a connection is (:class:`~signaling.state.Participant`), pure data.
- :mod:`signaling.ports`: the Broker, RoomStore and Timers interfaces the
  rooms work through, and :class:`~signaling.ports.StateUnavailable`;
  :mod:`signaling.inprocess` implements them for one node (the default),
  :mod:`signaling.redis` on Redis for several nodes (with ``redis.url`` set);
  both hand deliveries to a node's sockets through
  :mod:`signaling.subscribers`.
- :mod:`signaling.recording`: consent and the recording's phases per consult;
  :mod:`signaling.recorder`: the server-side recorder (aiortc, PyAV), which
  copies the browsers' encoded frames into the file: it takes them from
  aiortc's receivers with :mod:`signaling.receiver_tap`, reads what it needs
  of them with :mod:`signaling.media_codecs` (pure) and writes them with
  :mod:`signaling.muxer`. Each recording's recorder runs in a worker
  process of its own (:mod:`signaling.recorder_worker`), which the
  signaling process drives through :mod:`signaling.recorder_proxy` over the
  channel of :mod:`signaling.recorder_channel` (pure).
- :mod:`signaling.tickets`, :mod:`signaling.turn`, :mod:`signaling.ratelimit`:
  patient tickets, TURN credentials, per-connection rate limits.

Exports the rooms, what the server builds them with. Imports ``audit`` and
``config``, never ``server``.
"""

from signaling.rooms import ConsultRooms, Participant, RoomClosed, RoomSettings

__all__ = ["ConsultRooms", "Participant", "RoomClosed", "RoomSettings"]
