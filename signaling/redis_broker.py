"""The Broker and the Timers on Redis, for several server nodes.

:class:`RedisBroker` carries deliveries between nodes over Redis pub/sub,
one channel per consult and role, ``{prefix}:room:{consult}:{role}``.

Each broker holds one pub/sub connection with one pattern subscription,
``PSUBSCRIBE {prefix}:room:*``, made in :meth:`RedisBroker.start`; a
:meth:`~RedisBroker.subscribe` only adds a local callback. Chosen over a
``SUBSCRIBE``/``UNSUBSCRIBE`` per channel because:

- "from now on" holds the moment ``subscribe`` returns: there is no
  subscribe confirmation to wait for, so no window in which a delivery
  published by another node is lost;
- no command is ever sent on the pub/sub connection while the listener
  reads from it, and a reconnect has one pattern to restore, not one
  channel per open socket;
- the cost, every node receiving every room's deliveries, is small for a
  handful of nodes: signaling messages are few and small, and a delivery
  for a channel with no local callback is dropped before it is decoded.

With many nodes, per-channel subscriptions would save that traffic; the
change stays inside this module.

Pub/sub delivers at most once: deliveries published while a node is
disconnected from Redis are lost for that node. The signaling protocol
already copes with lost peers (reconnect grace, renegotiation).

:class:`RedisTimers` keeps deadlines in a sorted set of keys by due time
(``{prefix}:timers:due``) and their payloads in a hash
(``{prefix}:timers:payloads``); a Lua script claims due timers in one step,
moving them to a sorted set of claims by when they run out
(``{prefix}:timers:claimed``), so each is handed to one node, and again
only if that node never said it was done (it died).

:class:`RedisRoomStore` keeps each room's state as JSON with a lock per
room, and :class:`RedisNodes` which nodes are alive (heartbeats), so that a
dead node's participants get their grace period from another node.

All take a ``redis.asyncio.Redis`` client, with or without
``decode_responses``, and raise :class:`~signaling.broker.StateUnavailable`
(never the client's own errors) when Redis cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from signaling.broker import (
    Deliver,
    Delivery,
    Link,
    Presence,
    RecordingPhase,
    RoomPhase,
    RoomState,
    StateUnavailable,
    Subscription,
)
from signaling.protocol import ParticipantRole

__all__ = [
    "RedisBroker",
    "RedisNodes",
    "RedisRoomStore",
    "RedisTimers",
    "decode_delivery",
    "decode_room_state",
    "encode_delivery",
    "encode_room_state",
]

_log = structlog.get_logger("videoconsult.signaling")

# How long start() waits for Redis to confirm the pattern subscription.
_SUBSCRIBE_TIMEOUT_S = 5.0
# Reconnect backoff of the listener after Redis went away.
_RETRY_MIN_S = 0.1
_RETRY_MAX_S = 5.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Timers claimed per script call: bounds how long one call blocks Redis and
# stays far below Lua's limit on unpack() arguments.
_CLAIM_BATCH = 500


def encode_delivery(delivery: Delivery, *, origin: str = "") -> str:
    """Serialise a delivery for the wire: a JSON header line, then the text.

    The header holds the publishing node (``origin``, first, so that a node
    recognises its own deliveries without decoding them), ``message``,
    ``connection_id`` and ``close_code``, and never a raw newline (JSON
    escapes them), so the first newline ends it. A pre-encoded text (a
    relayed SDP of a few KB) follows as it is, rather than escaped inside
    the JSON again.
    """
    header = json.dumps(
        {
            "origin": origin,
            "message": delivery.message,
            "connection_id": delivery.connection_id,
            "close_code": delivery.close_code,
            "has_text": delivery.text is not None,
        },
        separators=(",", ":"),
    )
    return header if delivery.text is None else f"{header}\n{delivery.text}"


def decode_delivery(data: str) -> Delivery:
    """Rebuild a delivery from :func:`encode_delivery`'s output.

    Raises ValueError when ``data`` is not such an output.
    """
    header_text, newline, text = data.partition("\n")
    header = json.loads(header_text)
    if not isinstance(header, dict) or not isinstance(header.get("message"), dict):
        raise ValueError("delivery header is not an object with a message object")
    connection_id = header.get("connection_id")
    close_code = header.get("close_code")
    if connection_id is not None and not isinstance(connection_id, str):
        raise ValueError(f"delivery connection_id is a {type(connection_id).__name__}")
    if close_code is not None and (isinstance(close_code, bool) or not isinstance(close_code, int)):
        raise ValueError(f"delivery close_code is a {type(close_code).__name__}")
    if bool(header.get("has_text")) != bool(newline):
        raise ValueError("delivery header and text disagree on whether there is a text")
    return Delivery(
        header["message"],
        connection_id=connection_id,
        close_code=close_code,
        text=text if newline else None,
    )


# A room's changes are published on {prefix}:room:{consult}:state, which the
# brokers' pattern subscription receives with the deliveries.
_STATE_SUFFIX = ":state"


def _state_channel(prefix: str, consult_id: uuid.UUID) -> str:
    return f"{prefix}:room:{consult_id}{_STATE_SUFFIX}"


def _glob_escaped(text: str) -> str:
    """``text`` matched literally in a PSUBSCRIBE pattern."""
    for special in "\\*?[]":
        text = text.replace(special, f"\\{special}")
    return text


def _origin_marker(node_id: str) -> str:
    """How :func:`encode_delivery`'s output from ``node_id`` begins."""
    return '{"origin":' + json.dumps(node_id) + ","


def _as_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _RedisSubscription:
    def __init__(self, owner: RedisBroker, channel: str, deliver: Deliver) -> None:
        self._owner = owner
        self.channel = channel
        self.deliver = deliver
        self.closed = False

    async def close(self) -> None:
        # Marked first: a dispatch already running skips it from here on.
        self.closed = True
        subscribers = self._owner._subscribers.get(self.channel)
        if subscribers is None:
            return
        subscribers.discard(self)
        if not subscribers:
            del self._owner._subscribers[self.channel]


class _Publisher:
    """Sends publishes in pipelines: whatever was queued while the last
    pipeline was on its way goes in the next one, in the order queued.

    One pipeline at a time, so deliveries to a channel keep their order;
    under load one round trip carries many deliveries instead of one each,
    on one pooled connection instead of one each.
    """

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._queue: list[tuple[str, str, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def publish(self, channel: str, data: str) -> None:
        """Publish ``data`` on ``channel``; :class:`StateUnavailable` when
        Redis did not take it."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((channel, data, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="redis-broker-publisher")
        await future

    async def close(self) -> None:
        """Wait for what is queued to be sent (or fail)."""
        sender = self._sender
        if sender is not None:
            await asyncio.shield(sender)

    async def _send(self) -> None:
        batch: list[tuple[str, str, asyncio.Future[None]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    async with self._client.pipeline(transaction=False) as pipe:
                        for channel, data, _future in batch:
                            pipe.publish(channel, data)
                        await pipe.execute()
                except (RedisError, OSError) as err:
                    _fail(batch, f"Redis is unreachable (publishing): {type(err).__name__}")
                else:
                    for _channel, _data, future in batch:
                        if not future.done():
                            future.set_result(None)
                batch = []
        finally:
            self._sender = None
            # Cancelled (the loop closing): nothing queued waits forever.
            _fail(batch + self._queue, "the delivery was not sent: the broker is closing")
            self._queue = []


def _fail(batch: list[tuple[str, str, asyncio.Future[None]]], why: str) -> None:
    for _channel, _data, future in batch:
        if not future.done():
            future.set_exception(StateUnavailable(why))


async def _close_pubsub(pubsub: PubSub) -> None:
    """Close a pub/sub connection.

    Older releases of redis-py leave ``PubSub.aclose`` without annotations, newer
    releases type it; the cast gives it one type on either side, so an upgrade
    of redis-py does not change what mypy says here.
    """
    aclose = cast(Callable[[], Awaitable[None]], pubsub.aclose)
    await aclose()


class RedisBroker:
    """Deliveries between nodes over Redis pub/sub; see the module docstring.

    Call :meth:`start` before the first ``subscribe`` and :meth:`close` when
    done. ``publish`` works without ``start`` (a node may only send).
    Callbacks run on the listener task one after another, in the order
    Redis delivered, so a slow callback delays the ones after it: as the
    :data:`~signaling.broker.Deliver` contract says, they must not wait on a
    client that does not read.
    """

    def __init__(self, client: Redis, *, prefix: str, node_id: str = "") -> None:
        self._client = client
        self._prefix = prefix
        self._node_id = node_id or uuid.uuid4().hex
        self._own = _origin_marker(self._node_id)
        self._subscribers: dict[str, set[_RedisSubscription]] = {}
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._publisher = _Publisher(client)
        self._rooms: RedisRoomStore | None = None
        self._room_ids_from = len(f"{prefix}:room:")

    def watch_rooms(self, store: RedisRoomStore) -> None:
        """Feed ``store`` the room changes published on any node, so that it
        can answer ``peek`` from memory (see :class:`RedisRoomStore`).

        The store is told each time the feed may have missed changes: when
        the listener loses Redis and when it (re)subscribes.
        """
        self._rooms = store

    def channel(self, consult_id: uuid.UUID, role: ParticipantRole) -> str:
        return f"{self._prefix}:room:{consult_id}:{role.value}"

    async def start(self) -> None:
        """Subscribe to the rooms' pattern and start the listener.

        Returns once Redis confirmed the subscription: from then on, every
        delivery published on any node reaches this node. Raises
        RuntimeError when already started.
        """
        if self._listener is not None:
            raise RuntimeError("RedisBroker is already started; close() it first")
        pubsub = self._client.pubsub()
        try:
            await pubsub.psubscribe(f"{_glob_escaped(self._prefix)}:room:*")
            async with asyncio.timeout(_SUBSCRIBE_TIMEOUT_S):
                while True:
                    message = await pubsub.get_message(timeout=_SUBSCRIBE_TIMEOUT_S)
                    if message is not None and message["type"] == "psubscribe":
                        break
        except BaseException:
            await _close_pubsub(pubsub)
            raise
        if self._rooms is not None:
            self._rooms.feed_restarted()
        self._pubsub = pubsub
        self._listener = asyncio.create_task(self._listen(pubsub), name="redis-broker-listener")

    @property
    def started(self) -> bool:
        return self._listener is not None

    async def start_when_reachable(self) -> None:
        """:meth:`start`, tried again with backoff until Redis answers (a
        node may start while Redis is away)."""
        retry_in_s = _RETRY_MIN_S
        while self._listener is None:
            try:
                await self.start()
            except (RedisError, OSError, TimeoutError) as err:
                _log.warning(
                    "broker cannot subscribe yet", error=type(err).__name__, retry_in_s=retry_in_s
                )
                await asyncio.sleep(retry_in_s)
                retry_in_s = min(retry_in_s * 2, _RETRY_MAX_S)

    async def close(self) -> None:
        """Stop the listener and close the pub/sub connection; idempotent.

        Subscriptions stay registered but receive nothing more. Both steps
        run even when the first fails.
        """
        listener, self._listener = self._listener, None
        pubsub, self._pubsub = self._pubsub, None
        if self._rooms is not None:
            self._rooms.feed_stopped()
        errors: list[BaseException] = []
        if listener is not None:
            listener.cancel()
            try:
                await listener
            except asyncio.CancelledError:
                pass
            except Exception as err:
                errors.append(err)
        if pubsub is not None:
            try:
                await _close_pubsub(pubsub)
            except Exception as err:
                errors.append(err)
        try:
            await self._publisher.close()
        except Exception as err:
            errors.append(err)
        if errors:
            raise errors[0]

    @property
    def node_id(self) -> str:
        return self._node_id

    async def publish(
        self,
        consult_id: uuid.UUID,
        role: ParticipantRole,
        delivery: Delivery,
        *,
        where: str | None = None,
    ) -> None:
        """Deliver to this node's subscribers at once, and through Redis to the others'.

        ``where``: the node the receiver is on, when the caller knows it.
        When that is this node and a subscriber is here, Redis is skipped
        altogether. This node skips its own deliveries when Redis echoes
        them. When Redis cannot be reached, a delivery that reached a
        subscriber here counts as done (two participants on one node go on
        talking); one that reached nobody raises :class:`StateUnavailable`.
        """
        channel = self.channel(consult_id, role)
        local = self._subscribers.get(channel)
        if local:
            await self._deliver_all(local, delivery)
            if where == self._node_id:
                return
        try:
            await self._publisher.publish(channel, encode_delivery(delivery, origin=self._node_id))
        except StateUnavailable as err:
            if not local:
                raise StateUnavailable(f"the delivery went nowhere: {err}") from err
            _log.debug("delivery kept to this node: Redis unreachable")

    async def subscribe(
        self, consult_id: uuid.UUID, role: ParticipantRole, deliver: Deliver
    ) -> Subscription:
        if self._listener is None:
            raise StateUnavailable("the Redis broker is not started (Redis unreachable so far?)")
        channel = self.channel(consult_id, role)
        subscription = _RedisSubscription(self, channel, deliver)
        self._subscribers.setdefault(channel, set()).add(subscription)
        return subscription

    async def _listen(self, pubsub: PubSub) -> None:
        retry_in_s = _RETRY_MIN_S
        while True:
            try:
                # Blocks without a socket timeout (redis-py reads pub/sub with
                # none when blocking); reconnects and re-subscribes on its own.
                message = await pubsub.get_message(timeout=None)
            except (RedisError, OSError) as err:
                if self._rooms is not None:
                    self._rooms.feed_stopped()
                _log.warning(
                    "broker listener lost Redis", error=type(err).__name__, retry_in_s=retry_in_s
                )
                await asyncio.sleep(retry_in_s)
                retry_in_s = min(retry_in_s * 2, _RETRY_MAX_S)
                continue
            retry_in_s = _RETRY_MIN_S
            if message is None:
                continue
            if message["type"] == "psubscribe":
                # redis-py reconnected and subscribed again on its own:
                # room changes published in between never reached us.
                if self._rooms is not None:
                    self._rooms.feed_restarted()
                continue
            if message["type"] != "pmessage":
                continue
            await self._dispatch(_as_str(message["channel"]), message["data"])

    async def _dispatch(self, channel: str, data: str | bytes) -> None:
        if channel.endswith(_STATE_SUFFIX):
            if self._rooms is not None:
                self._room_changed(channel, data)
            return
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        try:
            text = _as_str(data)
            if text.startswith(self._own):
                return  # published here, and delivered here already
            delivery = decode_delivery(text)
        except (ValueError, UnicodeDecodeError) as err:
            # Logged without the data: it may hold what a participant said.
            _log.warning("undecodable delivery dropped", error=type(err).__name__)
            return
        await self._deliver_all(subscribers, delivery)

    def _room_changed(self, channel: str, data: str | bytes) -> None:
        assert self._rooms is not None
        try:
            consult_id = uuid.UUID(channel[self._room_ids_from : -len(_STATE_SUFFIX)])
            self._rooms.changed(consult_id, _as_str(data))
        except (ValueError, UnicodeDecodeError, StateUnavailable) as err:
            # Never published by this code; the room is read from Redis again.
            _log.warning("undecodable room change dropped", error=type(err).__name__)
            self._rooms.feed_restarted()

    @staticmethod
    async def _deliver_all(subscribers: set[_RedisSubscription], delivery: Delivery) -> None:
        for subscription in list(subscribers):
            if subscription.closed:
                continue
            try:
                await subscription.deliver(delivery)
            except Exception as err:
                # One broken receiver must not stop the others or the listener.
                # The error's type only: its message may quote the delivery.
                _log.warning("delivery failed", error=type(err).__name__)


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


def _score_us(moment: datetime) -> int:
    """Microseconds since the epoch: exact in a sorted set's double score
    (below 2**53 until the year 2255), where float seconds would round."""
    if moment.tzinfo is None:
        raise ValueError(f"timer time {moment.isoformat()} has no time zone")
    since = moment - _EPOCH
    return (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds


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
        score = _score_us(due_at)
        encoded = json.dumps(payload, separators=(",", ":"))
        # One transaction: a claim never sees the new time with the old
        # payload, and a timer set again is no longer claimed.
        with _redis_trouble("setting a timer"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zadd(self._due_key, {key: score})
                pipe.hset(self._payloads_key, key, encoded)
                pipe.zrem(self._claimed_key, key)
                await pipe.execute()

    async def cancel(self, key: str) -> None:
        with _redis_trouble("cancelling a timer"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(self._due_key, key)
                pipe.zrem(self._claimed_key, key)
                pipe.hdel(self._payloads_key, key)
                await pipe.execute()

    async def claim_due(self, now: datetime) -> list[tuple[str, dict[str, Any]]]:
        score, lease_end = _score_us(now), _score_us(now + self._lease)
        due: list[tuple[str, dict[str, Any]]] = []
        while True:
            with _redis_trouble("claiming timers"):
                claimed: list[int | str | bytes] = await self._claim_due(
                    keys=[self._due_key, self._payloads_key, self._claimed_key],
                    args=[score, _CLAIM_BATCH, lease_end],
                )
            more, items = claimed[0] == 1, cast(list[str | bytes], claimed[1:])
            for index in range(0, len(items), 2):
                key, payload = _as_str(items[index]), _as_str(items[index + 1])
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
        with _redis_trouble("finishing a timer"):
            await self._done(keys=[self._claimed_key, self._payloads_key], args=[key])


@contextlib.contextmanager
def _redis_trouble(what: str) -> Iterator[None]:
    """Turn the client's errors into :class:`StateUnavailable`, naming ``what`` failed."""
    try:
        yield
    except (RedisError, OSError) as err:
        raise StateUnavailable(f"Redis is unreachable ({what}): {type(err).__name__}") from err


def _moment(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"a time is a {type(value).__name__}")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("a time without a time zone")
    return moment


def _presence_dict(presence: Presence | None) -> dict[str, Any] | None:
    if presence is None:
        return None
    return {
        "connection": presence.connection_id,
        "link": presence.link.value,
        "left_at": presence.left_at.isoformat() if presence.left_at else None,
        "node": presence.node,
    }


def _presence(value: Any) -> Presence | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"a presence is a {type(value).__name__}")
    connection_id, node = value.get("connection"), value.get("node", "")
    if not isinstance(connection_id, str) or not isinstance(node, str):
        raise ValueError("a presence's connection and node are strings")
    return Presence(
        connection_id, Link(value.get("link")), left_at=_moment(value.get("left_at")), node=node
    )


def encode_room_state(state: RoomState) -> str:
    """A room's state as JSON (the display name included: Redis keeps nothing on disk)."""
    return json.dumps(
        {
            "phase": state.phase.value,
            "therapist": _presence_dict(state.therapist),
            "patient": _presence_dict(state.patient),
            "display_name": state.display_name,
            "recording": state.recording.value,
            "keep_until": state.keep_until.isoformat() if state.keep_until else None,
        },
        separators=(",", ":"),
    )


def decode_room_state(data: str | bytes) -> RoomState:
    """Rebuild :func:`encode_room_state`'s output; ValueError when it is not one."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"a room state is a {type(value).__name__}")
    display_name = value.get("display_name")
    if display_name is not None and not isinstance(display_name, str):
        raise ValueError("a room's display name is a string")
    return RoomState(
        phase=RoomPhase(value.get("phase")),
        therapist=_presence(value.get("therapist")),
        patient=_presence(value.get("patient")),
        display_name=display_name,
        recording=RecordingPhase(value.get("recording", RecordingPhase.OFF.value)),
        keep_until=_moment(value.get("keep_until")),
    )


# Each saved room state is stored and published as "{version} {json}"; a
# dropped room is published as "{version} " (nothing after the space). The
# version comes from the room clock, {prefix}:roomclock: Redis's own time in
# microseconds, or one more than the last version handed out if that is
# later, so versions only grow, across rooms and across a Redis restart
# that lost every key, and each node can tell an older change from a newer.
_NEXT_VERSION = """
local function next_version(clock_key)
  local now = redis.call('TIME')
  local version = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local last = tonumber(redis.call('GET', clock_key) or '0')
  if last >= version then
    version = last + 1
  end
  local text = string.format('%.0f', version)
  redis.call('SET', clock_key, text)
  return text
end
"""

# KEYS: lock, state, clock. ARGV: token, state (JSON), state TTL (ms), channel.
# Saves the state, publishes it and releases the lock only while the lock is
# still ours: a holder whose lock ran out (it stalled past the lock's TTL,
# and another node may have changed the room since) saves nothing, and gets
# 0. Otherwise returns the version (a string).
_SAVE_AND_RELEASE = (
    _NEXT_VERSION
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local value = next_version(KEYS[3]) .. ' ' .. ARGV[2]
redis.call('SET', KEYS[2], value, 'PX', ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[4], value)
return value
"""
)

# KEYS: lock, state, clock. ARGV: token, channel. Drops the room, publishes
# that, and releases the lock if it is still ours; returns the published
# value.
_FORGET_AND_RELEASE = (
    _NEXT_VERSION
    + """
redis.call('DEL', KEYS[2])
local value = next_version(KEYS[3]) .. ' '
redis.call('PUBLISH', ARGV[2], value)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return value
"""
)

# KEYS: lock. ARGV: token. Releases the lock only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Rooms remembered (see RedisRoomStore).
_CACHED_ROOMS = 10_000
# How long a remembered room answers peek before it is read again, even
# with no change heard: bounds what a change the feed never saw (a room
# that expired in Redis) can leave wrong.
_CACHE_FRESH_S = 5.0
_LOCK_POLL_MIN_S = 0.002
_LOCK_POLL_MAX_S = 0.05


def _versioned(value: str | bytes) -> tuple[int, str]:
    """Split a stored or published room value into its version and JSON
    ("" for a dropped room); ValueError when it is neither."""
    text = _as_str(value)
    if text.startswith("{"):
        return 0, text  # saved before rooms had versions
    version, space, state = text.partition(" ")
    if not space:
        raise ValueError("a room value has no version")
    return int(version), state


@dataclass
class _Remembered:
    state: RoomState | None
    version: int
    # The feed's generation when this was read: changes are heard for it
    # only while the feed has not restarted since.
    generation: int
    # When (event loop time).
    at: float


class RedisRoomStore:
    """Each room's state as JSON under ``{prefix}:roomstate:{consult}``, with
    a lock per room, ``{prefix}:roomlock:{consult}``.

    Both expire: the state ``state_ttl`` after its last change, or that long
    after its ``keep_until`` (a consult booked ahead), so longer than a room
    lives (an invite's validity, a consult's maximum duration, the hour an
    ended room is kept); the lock ``lock_ttl_s`` after it was taken.
    A node that dies leaves nothing behind for longer than that.

    The lock is a token under ``SET NX PX``; saving the state and releasing
    the lock is one script that checks the token first, so a holder that
    stalled past the lock's expiry saves nothing (and gets
    :class:`StateUnavailable`) instead of overwriting a newer change.
    redis-py's ``Lock`` could take the lock but not save under it in one step.

    ``peek`` (each relayed message asks it) answers from memory when it can.
    The same script that saves a room publishes the new state, with a
    version, on ``{prefix}:room:{consult}:state``; a :class:`RedisBroker`
    that :meth:`~RedisBroker.watch_rooms` this store feeds those changes to
    it, in the order Redis made them and before any delivery published
    after them. A remembered room answers while the feed has run without a
    break since it was read, and for at most a few seconds; otherwise peek
    reads Redis. Without a broker feeding it, every peek reads Redis.

    When Redis cannot be reached, ``peek`` answers from the last state this
    node saw of the room, so consults whose participants are both on this
    node keep relaying through an outage. Everything else raises
    :class:`StateUnavailable` then.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        state_ttl: timedelta,
        lock_ttl_s: float = 10.0,
        lock_wait_s: float = 5.0,
        fresh_s: float = _CACHE_FRESH_S,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._fresh_s = fresh_s
        self._clock_key = f"{prefix}:roomclock"
        self._state_ttl_ms = int(state_ttl.total_seconds() * 1000)
        self._lock_ttl_ms = int(lock_ttl_s * 1000)
        self._lock_wait_s = lock_wait_s
        self._save_and_release = client.register_script(_SAVE_AND_RELEASE)
        self._forget_and_release = client.register_script(_FORGET_AND_RELEASE)
        self._release = client.register_script(_RELEASE)
        self._seen: OrderedDict[uuid.UUID, _Remembered] = OrderedDict()
        self._fed = False
        self._generation = 0

    def state_key(self, consult_id: uuid.UUID) -> str:
        return f"{self._prefix}:roomstate:{consult_id}"

    def lock_key(self, consult_id: uuid.UUID) -> str:
        return f"{self._prefix}:roomlock:{consult_id}"

    def feed_restarted(self) -> None:
        """The feed of changes (re)started: changes may have been missed, so
        nothing remembered before answers ``peek`` until read again."""
        self._fed = True
        self._generation += 1

    def feed_stopped(self) -> None:
        """The feed of changes stopped: every ``peek`` reads Redis until it
        restarts (and answers from memory only when Redis cannot be reached)."""
        self._fed = False
        self._generation += 1

    def changed(self, consult_id: uuid.UUID, value: str) -> None:
        """A change to the room heard on the feed (a published value).

        Raises ValueError (or StateUnavailable) when it is unreadable."""
        version, encoded = _versioned(value)
        state = self._decode(consult_id, encoded) if encoded else None
        self._remember(consult_id, state, version, self._generation)

    @asynccontextmanager
    async def locked(
        self, consult_id: uuid.UUID, *, create: bool = False
    ) -> AsyncIterator[RoomState | None]:
        lock_key, state_key = self.lock_key(consult_id), self.state_key(consult_id)
        token = secrets.token_hex(16)
        await self._acquire(lock_key, token)
        saved = False
        try:
            generation = self._generation
            with _redis_trouble("reading a room"):
                raw = await self._client.get(state_key)
            if raw is None and not create:
                yield None
                return
            if raw is None:
                version, before, state = 0, None, RoomState()
            else:
                version, before = self._read(consult_id, raw)
                state = self._decode(consult_id, before)
            yield state
            encoded = encode_room_state(state)
            if encoded == before:
                # Unchanged (most blocks only look): nothing to write.
                self._remember(consult_id, state.copy(), version, generation)
                return
            with _redis_trouble("saving a room"):
                value = await self._save_and_release(
                    keys=[lock_key, state_key, self._clock_key],
                    args=[
                        token,
                        encoded,
                        self._ttl_ms(state),
                        _state_channel(self._prefix, consult_id),
                    ],
                )
            saved = value != 0
            if not saved:
                raise StateUnavailable("the room's lock ran out before its change was saved")
            version, _ = self._read(consult_id, value)
            self._remember(consult_id, state.copy(), version, generation)
        finally:
            if not saved:
                with contextlib.suppress(RedisError, OSError):
                    await self._release(keys=[lock_key], args=[token])

    async def peek(self, consult_id: uuid.UUID) -> RoomState | None:
        seen = self._seen.get(consult_id)
        if (
            seen is not None
            and self._fed
            and seen.generation == self._generation
            and asyncio.get_running_loop().time() - seen.at < self._fresh_s
        ):
            return seen.state
        generation, started = self._generation, asyncio.get_running_loop().time()
        try:
            raw = await self._client.get(self.state_key(consult_id))
        except (RedisError, OSError) as err:
            seen = self._seen.get(consult_id)
            if seen is None:
                raise StateUnavailable(
                    f"Redis is unreachable (reading a room): {type(err).__name__}"
                ) from err
            return seen.state
        if raw is None:
            return self._remember(consult_id, None, 0, generation, missing_since=started)
        version, encoded = self._read(consult_id, raw)
        return self._remember(consult_id, self._decode(consult_id, encoded), version, generation)

    async def forget(self, consult_id: uuid.UUID) -> None:
        # Under the room's lock: a change begun before would otherwise save
        # the room again right after it was dropped.
        lock_key, token = self.lock_key(consult_id), secrets.token_hex(16)
        await self._acquire(lock_key, token)
        try:
            generation = self._generation
            with _redis_trouble("forgetting a room"):
                value = await self._forget_and_release(
                    keys=[lock_key, self.state_key(consult_id), self._clock_key],
                    args=[token, _state_channel(self._prefix, consult_id)],
                )
            # Gone, at this version: a change heard late from before it loses.
            version, _ = self._read(consult_id, value)
            self._remember(consult_id, None, version, generation)
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await self._release(keys=[lock_key], args=[token])
            raise

    async def consult_ids(self) -> list[uuid.UUID]:
        found: list[uuid.UUID] = []
        start = len(self.state_key(uuid.UUID(int=0))) - 36
        with _redis_trouble("listing rooms"):
            async for key in self._client.scan_iter(
                match=f"{_glob_escaped(self._prefix)}:roomstate:*", count=500
            ):
                with contextlib.suppress(ValueError):
                    found.append(uuid.UUID(_as_str(key)[start:]))
        return found

    def _ttl_ms(self, state: RoomState) -> int:
        if state.keep_until is None:
            return self._state_ttl_ms
        until_ms = (state.keep_until - datetime.now(UTC)).total_seconds() * 1000
        return self._state_ttl_ms + max(0, int(until_ms))

    async def _acquire(self, lock_key: str, token: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_wait_s
        poll_s = _LOCK_POLL_MIN_S
        while True:
            with _redis_trouble("locking a room"):
                if await self._client.set(lock_key, token, nx=True, px=self._lock_ttl_ms):
                    return
            if loop.time() + poll_s > deadline:
                raise StateUnavailable(
                    f"a room stayed locked for {self._lock_wait_s:g} s (another node holds it)"
                )
            await asyncio.sleep(poll_s)
            poll_s = min(poll_s * 2, _LOCK_POLL_MAX_S)

    def _read(self, consult_id: uuid.UUID, raw: str | bytes) -> tuple[int, str]:
        try:
            return _versioned(raw)
        except (ValueError, UnicodeDecodeError) as err:
            _log.error("room state in Redis is unreadable", error=type(err).__name__)
            raise StateUnavailable("the room's state in Redis is unreadable") from err

    def _decode(self, consult_id: uuid.UUID, raw: str) -> RoomState:
        try:
            return decode_room_state(raw)
        except (ValueError, UnicodeDecodeError) as err:
            # Never written by this code; logged without the data (a display name).
            _log.error("room state in Redis is unreadable", error=type(err).__name__)
            raise StateUnavailable("the room's state in Redis is unreadable") from err

    def _remember(
        self,
        consult_id: uuid.UUID,
        state: RoomState | None,
        version: int,
        generation: int,
        *,
        missing_since: float | None = None,
    ) -> RoomState | None:
        """Keep ``state`` unless a newer version of the room is known; return
        whichever is newer, remembered from now (and so answering ``peek``
        for a while if ``generation`` is the feed's).

        Versions only grow, so they order changes heard on the feed and read
        from Redis alike. A room Redis did not have (it may have expired)
        has no version: ``missing_since`` is when the read began, and only a
        change heard after that is newer."""
        loop = asyncio.get_running_loop()
        seen = self._seen.get(consult_id)
        if seen is not None:
            if missing_since is None and seen.version > version:
                return seen.state
            if missing_since is not None and seen.at >= missing_since:
                return seen.state
            if seen.version == version:
                # The same version again: known current for the later feed.
                generation = max(generation, seen.generation)
        self._seen[consult_id] = _Remembered(state, version, generation, loop.time())
        self._seen.move_to_end(consult_id)
        while len(self._seen) > _CACHED_ROOMS:
            self._seen.popitem(last=False)
        return state


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
        with _redis_trouble("heartbeat"):
            added = await self._client.zadd(self._key, {self.node_id: _score_us(now)})
        return bool(added)

    async def claim_dead(self, now: datetime) -> list[tuple[str, datetime]]:
        """The nodes dead at ``now`` that this caller claimed, with their last heartbeat."""
        with _redis_trouble("looking for dead nodes"):
            stale = await self._client.zrangebyscore(
                self._key, "-inf", _score_us(now - self._dead_after), withscores=True
            )
            claimed: list[tuple[str, datetime]] = []
            for member, score in cast(list[tuple[str | bytes, float]], stale):
                node = _as_str(member)
                if node == self.node_id:
                    continue  # this node stalled; its next beat puts it back
                if await self._client.zrem(self._key, member):
                    claimed.append((node, _EPOCH + timedelta(microseconds=int(score))))
        return claimed

    async def leave(self) -> None:
        """Off the list (a clean shutdown; its sockets were closed as usual)."""
        with _redis_trouble("leaving"):
            await self._client.zrem(self._key, self.node_id)
