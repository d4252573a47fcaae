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
(``{prefix}:timers:payloads``); a Lua script claims due timers and removes
them in one step, so each is handed out exactly once across nodes.

Both take a ``redis.asyncio.Redis`` client, with or without
``decode_responses``, and let :class:`redis.RedisError` through from
``publish``, ``schedule``, ``cancel`` and ``claim_due``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from signaling.broker import Deliver, Delivery, Subscription
from signaling.protocol import ParticipantRole

__all__ = ["RedisBroker", "RedisTimers", "decode_delivery", "encode_delivery"]

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


def encode_delivery(delivery: Delivery) -> str:
    """Serialise a delivery for the wire: a JSON header line, then the text.

    The header holds ``message``, ``connection_id`` and ``close_code`` and
    never a raw newline (JSON escapes them), so the first newline ends it.
    A pre-encoded text (a relayed SDP of a few KB) follows as it is, rather
    than escaped inside the JSON again.
    """
    header = json.dumps(
        {
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


def _glob_escaped(text: str) -> str:
    """``text`` matched literally in a PSUBSCRIBE pattern."""
    for special in "\\*?[]":
        text = text.replace(special, f"\\{special}")
    return text


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


class RedisBroker:
    """Deliveries between nodes over Redis pub/sub; see the module docstring.

    Call :meth:`start` before the first ``subscribe`` and :meth:`close` when
    done. ``publish`` works without ``start`` (a node may only send).
    Callbacks run on the listener task one after another, in the order
    Redis delivered, so a slow callback delays the ones after it: as the
    :data:`~signaling.broker.Deliver` contract says, they must not wait on a
    client that does not read.
    """

    def __init__(self, client: Redis, *, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._subscribers: dict[str, set[_RedisSubscription]] = {}
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None

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
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it bare
            raise
        self._pubsub = pubsub
        self._listener = asyncio.create_task(self._listen(pubsub), name="redis-broker-listener")

    async def close(self) -> None:
        """Stop the listener and close the pub/sub connection; idempotent.

        Subscriptions stay registered but receive nothing more. Both steps
        run even when the first fails.
        """
        listener, self._listener = self._listener, None
        pubsub, self._pubsub = self._pubsub, None
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
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it bare
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]

    async def publish(
        self, consult_id: uuid.UUID, role: ParticipantRole, delivery: Delivery
    ) -> None:
        await self._client.publish(self.channel(consult_id, role), encode_delivery(delivery))

    async def subscribe(
        self, consult_id: uuid.UUID, role: ParticipantRole, deliver: Deliver
    ) -> Subscription:
        if self._listener is None:
            raise RuntimeError("RedisBroker is not started; call start() before subscribe()")
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
                _log.warning(
                    "broker listener lost Redis", error=type(err).__name__, retry_in_s=retry_in_s
                )
                await asyncio.sleep(retry_in_s)
                retry_in_s = min(retry_in_s * 2, _RETRY_MAX_S)
                continue
            retry_in_s = _RETRY_MIN_S
            if message is None or message["type"] != "pmessage":
                continue
            await self._dispatch(_as_str(message["channel"]), message["data"])

    async def _dispatch(self, channel: str, data: str | bytes) -> None:
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        try:
            delivery = decode_delivery(_as_str(data))
        except (ValueError, UnicodeDecodeError) as err:
            # Logged without the data: it may hold what a participant said.
            _log.warning("undecodable delivery dropped", error=type(err).__name__)
            return
        for subscription in list(subscribers):
            if subscription.closed:
                continue
            try:
                await subscription.deliver(delivery)
            except Exception as err:
                # One broken receiver must not stop the others or the listener.
                # The error's type only: its message may quote the delivery.
                _log.warning("delivery failed", error=type(err).__name__)


# KEYS: due set, payload hash. ARGV: now (µs since the epoch), batch size.
# Returns key, payload, key, payload, ... in due order. Atomic, as every
# script is: two nodes claiming at once never see the same timer.
_CLAIM_DUE = """
local keys = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #keys == 0 then
  return {}
end
local payloads = redis.call('HMGET', KEYS[2], unpack(keys))
redis.call('ZREM', KEYS[1], unpack(keys))
redis.call('HDEL', KEYS[2], unpack(keys))
local claimed = {}
for i, key in ipairs(keys) do
  claimed[2 * i - 1] = key
  claimed[2 * i] = payloads[i] or ''
end
return claimed
"""


def _score_us(moment: datetime) -> int:
    """Microseconds since the epoch: exact in a sorted set's double score
    (below 2**53 until the year 2255), where float seconds would round."""
    if moment.tzinfo is None:
        raise ValueError(f"timer time {moment.isoformat()} has no time zone")
    since = moment - _EPOCH
    return (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds


class RedisTimers:
    """Deadlines in Redis, each handed out once to whichever node claims it first.

    Times must be time-zone aware (a naive time is refused with ValueError:
    its meaning would depend on each node's local zone).
    """

    def __init__(self, client: Redis, *, prefix: str) -> None:
        self._client = client
        self._due_key = f"{prefix}:timers:due"
        self._payloads_key = f"{prefix}:timers:payloads"
        self._claim_due = client.register_script(_CLAIM_DUE)

    @property
    def keys(self) -> tuple[str, str]:
        """The Redis keys this uses (for tests and clean-up)."""
        return (self._due_key, self._payloads_key)

    async def schedule(self, key: str, due_at: datetime, payload: dict[str, Any]) -> None:
        score = _score_us(due_at)
        encoded = json.dumps(payload, separators=(",", ":"))
        # One transaction: a claim never sees the new time with the old payload.
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zadd(self._due_key, {key: score})
            pipe.hset(self._payloads_key, key, encoded)
            await pipe.execute()

    async def cancel(self, key: str) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zrem(self._due_key, key)
            pipe.hdel(self._payloads_key, key)
            await pipe.execute()

    async def claim_due(self, now: datetime) -> list[tuple[str, dict[str, Any]]]:
        score = _score_us(now)
        due: list[tuple[str, dict[str, Any]]] = []
        while True:
            claimed: list[str | bytes] = await self._claim_due(
                keys=[self._due_key, self._payloads_key], args=[score, _CLAIM_BATCH]
            )
            for index in range(0, len(claimed), 2):
                key, payload = _as_str(claimed[index]), _as_str(claimed[index + 1])
                try:
                    # An empty payload: the hash lost it (never by our own
                    # writes, which are transactions); the key still tells.
                    due.append((key, json.loads(payload) if payload else {}))
                except ValueError:
                    # Claimed and gone: handing it out half-read would be worse.
                    _log.warning("timer with an undecodable payload dropped", timer=key)
            if len(claimed) < 2 * _CLAIM_BATCH:
                return due
