"""Deliveries between nodes over Redis pub/sub: :class:`RedisBroker`.

One channel per consult and role, ``{prefix}:room:{consult}:{role}``.
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

The same pattern receives the room changes that
:class:`~signaling.redis.rooms.RedisRoomStore` publishes; the broker feeds
them to the store it :meth:`~RedisBroker.watch_rooms`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import cast

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from signaling.ports import Deliver, DeliverNow, Delivery, StateUnavailable, Subscription
from signaling.protocol import ParticipantRole
from signaling.redis.codec import (
    as_str,
    decode_delivery,
    encode_delivery,
    glob_escaped,
    origin_marker,
)
from signaling.redis.errors import UNREACHABLE
from signaling.redis.rooms import STATE_SUFFIX, RedisRoomStore
from signaling.subscribers import LocalSubscribers, Receivers

__all__ = ["RedisBroker"]

_log = structlog.get_logger("videoconsult.signaling")

# How long start() waits for Redis to confirm the pattern subscription.
_SUBSCRIBE_TIMEOUT_S = 5.0
# Reconnect backoff of the listener after Redis went away.
_RETRY_MIN_S = 0.1
_RETRY_MAX_S = 5.0


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
                except UNREACHABLE as err:
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
    :data:`~signaling.ports.Deliver` contract says, they must not wait on a
    client that does not read.
    """

    def __init__(self, client: Redis, *, prefix: str, node_id: str = "") -> None:
        self._client = client
        self._prefix = prefix
        self._node_id = node_id or uuid.uuid4().hex
        self._own = origin_marker(self._node_id)
        self._subscribers: LocalSubscribers[str] = LocalSubscribers()
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
            await pubsub.psubscribe(f"{glob_escaped(self._prefix)}:room:*")
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
            except (*UNREACHABLE, TimeoutError) as err:
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
        delivered_here = await self._subscribers.deliver(channel, delivery)
        if delivered_here and where == self._node_id:
            return
        try:
            await self._publisher.publish(channel, encode_delivery(delivery, origin=self._node_id))
        except StateUnavailable as err:
            if not delivered_here:
                raise StateUnavailable(f"the delivery went nowhere: {err}") from err
            _log.debug("delivery kept to this node: Redis unreachable")

    def receivers_now(
        self, consult_id: uuid.UUID, role: ParticipantRole, *, where: str | None
    ) -> Receivers | None:
        """At once only where :meth:`publish` would skip Redis: the receiver
        on this node, and a subscriber of it here."""
        if where != self._node_id:
            return None
        receivers = self._subscribers.receivers_now(self.channel(consult_id, role))
        return receivers if receivers is not None and receivers.subscriptions else None

    async def subscribe(
        self,
        consult_id: uuid.UUID,
        role: ParticipantRole,
        deliver: Deliver,
        *,
        deliver_now: DeliverNow | None = None,
    ) -> Subscription:
        if self._listener is None:
            raise StateUnavailable("the Redis broker is not started (Redis unreachable so far?)")
        return self._subscribers.add(self.channel(consult_id, role), deliver, deliver_now)

    async def _listen(self, pubsub: PubSub) -> None:
        retry_in_s = _RETRY_MIN_S
        while True:
            try:
                # Blocks without a socket timeout (redis-py reads pub/sub with
                # none when blocking); reconnects and re-subscribes on its own.
                message = await pubsub.get_message(timeout=None)
            except UNREACHABLE as err:
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
            await self._dispatch(as_str(message["channel"]), message["data"])

    async def _dispatch(self, channel: str, data: str | bytes) -> None:
        if channel.endswith(STATE_SUFFIX):
            if self._rooms is not None:
                self._room_changed(channel, data)
            return
        if channel not in self._subscribers:
            return
        try:
            text = as_str(data)
            if text.startswith(self._own):
                return  # published here, and delivered here already
            delivery = decode_delivery(text)
        except (ValueError, UnicodeDecodeError) as err:
            # Logged without the data: it may hold what a participant said.
            _log.warning("undecodable delivery dropped", error=type(err).__name__)
            return
        await self._subscribers.deliver(channel, delivery)

    def _room_changed(self, channel: str, data: str | bytes) -> None:
        assert self._rooms is not None
        try:
            consult_id = uuid.UUID(channel[self._room_ids_from : -len(STATE_SUFFIX)])
            self._rooms.changed(consult_id, as_str(data))
        except (ValueError, UnicodeDecodeError, StateUnavailable) as err:
            # Never published by this code; the room is read from Redis again.
            _log.warning("undecodable room change dropped", error=type(err).__name__)
            self._rooms.feed_restarted()
