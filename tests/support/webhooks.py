"""A practice's record system, as far as webhooks go: an aiohttp server on
127.0.0.1 that verifies every message's signature with the
``standardwebhooks`` library and keeps what it was sent, deduplicated by
``webhook-id`` as the specification asks receivers to."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


@dataclass
class Received:
    webhook_id: str
    headers: dict[str, str]
    body: bytes

    @property
    def message(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Start it with :meth:`start`; stop and start it again to be "down for a while"."""

    port: int
    # The endpoint's secret, once the admin has registered it.
    secret: str = ""
    # Verified messages in the order they came, repeats included.
    received: list[Received] = field(default_factory=list)
    # Messages whose signature did not verify.
    refused: list[Received] = field(default_factory=list)
    # Seconds to wait before answering (to let deliveries overlap).
    delay_s: float = 0.0
    # Called with each verified message before the answer (e.g. to kill the sender).
    on_message: Callable[[Received], None] | None = None
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks?source=videoconsult"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        entry = Received(headers.get("webhook-id", ""), headers, body)
        try:
            Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError:
            self.refused.append(entry)
            self._arrived.set()
            return web.Response(status=401, text="signature does not verify")
        self.received.append(entry)
        if self.on_message is not None:
            self.on_message(entry)
        self._arrived.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.Response(status=204)

    def unique(self) -> dict[str, Received]:
        """The verified messages by webhook-id (the first of each)."""
        found: dict[str, Received] = {}
        for entry in self.received:
            found.setdefault(entry.webhook_id, entry)
        return found

    def repeats(self) -> dict[str, int]:
        """The webhook-ids that came more than once, and how often."""
        counts = Counter(entry.webhook_id for entry in self.received)
        return {webhook_id: n for webhook_id, n in counts.items() if n > 1}

    def of_type(self, kind: str) -> list[Any]:
        return [entry.message for entry in self.unique().values() if entry.message["type"] == kind]

    async def wait_for(self, predicate: Callable[[Receiver], bool], *, timeout_s: float) -> None:
        """Until ``predicate(self)`` holds; fails after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                self._arrived.clear()
                await self._arrived.wait()


@asynccontextmanager
async def running_receiver(port: int) -> AsyncIterator[Receiver]:
    """A :class:`Receiver` listening on ``port`` until the block ends."""
    found = Receiver(port)
    await found.start()
    try:
        yield found
    finally:
        await found.stop()
