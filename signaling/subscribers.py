"""This process's receivers of deliveries, by channel: where every broker's
delivery ends.

Both brokers keep their local ``deliver`` callbacks here (the in-process one
by consult and role, the Redis one by pub/sub channel), so that closing a
subscription and isolating a failing receiver work the same on one node and
on many.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Generic, TypeVar

import structlog

from signaling.ports import Deliver, DeliverNow, Delivery, Subscription

__all__ = ["LocalSubscribers", "Receivers"]

_log = structlog.get_logger("videoconsult.signaling")

Channel = TypeVar("Channel", bound=Hashable)


class _LocalSubscription(Generic[Channel]):
    __slots__ = ("_owner", "channel", "closed", "deliver", "deliver_now")

    def __init__(
        self,
        owner: LocalSubscribers[Channel],
        channel: Channel,
        deliver: Deliver,
        deliver_now: DeliverNow | None,
    ) -> None:
        self._owner = owner
        self.channel = channel
        self.deliver = deliver
        self.deliver_now = deliver_now
        self.closed = False

    async def close(self) -> None:
        # Marked first: a delivery already under way skips it from here on.
        self.closed = True
        self._owner._remove(self)
        # Receivers found before may outlive this (a silent sender's route
        # keeps them until its next relay): they must not keep the receiver
        # (a socket's outbox, its connection, its buffers) alive.
        self.deliver = _closed
        self.deliver_now = None


async def _closed(_delivery: Delivery) -> None:
    """What a closed subscription's ``deliver`` became: nothing."""


class LocalSubscribers(Generic[Channel]):
    """The ``deliver`` callbacks of this process, by channel."""

    def __init__(self) -> None:
        self._by_channel: dict[Channel, set[_LocalSubscription[Channel]]] = {}
        # Counts every subscription made or closed: what a Receivers found is
        # still so while this has not moved.
        self.version = 0

    def add(
        self, channel: Channel, deliver: Deliver, deliver_now: DeliverNow | None = None
    ) -> Subscription:
        """Call ``deliver`` for each delivery on ``channel`` from now on,
        until the returned subscription is closed (``deliver_now``, where
        given, for :meth:`deliver_now`)."""
        subscription = _LocalSubscription(self, channel, deliver, deliver_now)
        self._by_channel.setdefault(channel, set()).add(subscription)
        self.version += 1
        return subscription

    def __contains__(self, channel: object) -> bool:
        return channel in self._by_channel

    async def deliver(self, channel: Channel, delivery: Delivery) -> bool:
        """Hand ``delivery`` to each open subscription of ``channel``, one
        after another; False when ``channel`` had none.

        A receiver that raises stops neither the others nor the caller: it
        is logged by the error's type only, as its message may quote the
        delivery (what a participant said).
        """
        subscriptions = self._by_channel.get(channel)
        if not subscriptions:
            return False
        for subscription in list(subscriptions):
            if subscription.closed:
                continue
            try:
                await subscription.deliver(delivery)
            except Exception as err:
                _log.warning("delivery failed", error=type(err).__name__)
        return True

    def receivers_now(self, channel: Channel) -> Receivers | None:
        """The receivers of ``channel`` that take a delivery at once, without
        waiting (each subscription's ``deliver_now``), as they are until a
        subscription comes or goes (:attr:`Receivers.current`). None when
        one of them can only be delivered to by :meth:`deliver`; no
        receivers when ``channel`` has no subscription."""
        subscriptions = tuple(s for s in self._by_channel.get(channel, ()) if not s.closed)
        if any(s.deliver_now is None for s in subscriptions):
            return None
        return Receivers(self, subscriptions)

    def _remove(self, subscription: _LocalSubscription[Channel]) -> None:
        subscriptions = self._by_channel.get(subscription.channel)
        if subscriptions is None:
            return
        subscriptions.discard(subscription)
        self.version += 1
        if not subscriptions:
            del self._by_channel[subscription.channel]


class Receivers:
    """Who one channel's deliveries reach at once (see
    :meth:`LocalSubscribers.receivers_now`): kept by a relay that sends many
    messages the same way, and found again once it is no longer
    :attr:`current`."""

    __slots__ = ("owner", "subscriptions", "version")

    def __init__(
        self, owner: LocalSubscribers[Any], subscriptions: tuple[_LocalSubscription[Any], ...]
    ) -> None:
        self.owner = owner
        # Current while ``owner.version`` is this: no subscription came or
        # went since these were found (compared by the relay's hot path
        # itself: a property would cost a call per message).
        self.version = owner.version
        # The subscriptions, not their callables: one closed since lets go
        # of its receiver (_LocalSubscription.close).
        self.subscriptions = subscriptions

    @property
    def current(self) -> bool:
        """No subscription came or went since these were found."""
        return self.owner.version == self.version

    def deliver(self, delivery: Delivery) -> None:
        """Hand ``delivery`` to each, as :meth:`LocalSubscribers.deliver` does:
        a receiver that raises stops neither the others nor the caller."""
        for subscription in self.subscriptions:
            deliver_now = subscription.deliver_now
            if deliver_now is None:
                continue  # closed since these were found
            try:
                deliver_now(delivery)
            except Exception as err:
                _log.warning("delivery failed", error=type(err).__name__)
