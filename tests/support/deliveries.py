"""A receiver of deliveries for broker tests, on either implementation."""

from __future__ import annotations

import asyncio

from signaling.ports import Delivery

# Generous: deliveries take milliseconds; this only bounds a broken test.
WAIT_S = 5.0


class Recorder:
    """Keeps what its :meth:`deliver` (a :data:`~signaling.ports.Deliver`) got."""

    def __init__(self) -> None:
        self.got: list[Delivery] = []
        self._changed = asyncio.Event()

    async def deliver(self, delivery: Delivery) -> None:
        self.got.append(delivery)
        self._changed.set()

    async def wait_for(self, count: int) -> list[Delivery]:
        """Everything got, once there are ``count`` (at most :data:`WAIT_S` from now)."""
        async with asyncio.timeout(WAIT_S):
            while len(self.got) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.got
