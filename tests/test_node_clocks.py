"""Nodes whose system clocks differ: a node is dead by Redis's clock, never by
another node's.

Found in review: heartbeats were scored with each node's own wall clock, so a
node whose clock ran a few seconds ahead (drift, a VM resumed, a clock
stepped by hand) took a live node for dead at every round, and that node's
participants were told ``peer-reconnecting`` and ``peer-rejoined`` every
second. The room clock already used Redis's ``TIME``; the heartbeats do now.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import WSMsgType

from audit.clock import ManualClock
from server import create_app
from tests.support.harness import Harness, Sockets, admitted_pair
from tests.support.settings import SettingsFactory


class RunningClock(ManualClock):
    """The real time plus an offset (``advance`` moves it, as the harness's
    TOTP steps need)."""

    def __init__(self, offset_s: float = 0.0) -> None:
        self._offset = timedelta(seconds=offset_s)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += timedelta(seconds=seconds)


async def everything_heard(socket: Any, for_s: float) -> list[Any]:
    """Every message ``socket`` receives within ``for_s`` seconds (a close, as its type)."""
    heard: list[Any] = []
    deadline = asyncio.get_running_loop().time() + for_s
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            frame = await socket.receive(timeout=left)
        except TimeoutError:
            break
        if frame.type is not WSMsgType.TEXT:
            heard.append(frame.type)
            break
        heard.append(frame.json())
    return heard


async def test_a_node_whose_clock_runs_ahead_does_not_take_a_live_node_for_dead(
    migrated_postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    make_settings: SettingsFactory,
    aiohttp_client: Any,
) -> None:
    settings = make_settings(
        database_url=migrated_postgres_url, redis_url=redis_url, redis_key_prefix=redis_prefix
    )
    clock_a = RunningClock()
    app_a = create_app(settings, clock=clock_a)
    harness = Harness(app_a, await aiohttp_client(app_a), clock_a)
    sockets = Sockets(harness)
    try:
        _setup, therapist, patient = await admitted_pair(harness, sockets)
        # Node B, whose system clock is 6 s ahead of A's (more than a node
        # may be silent), runs its node job: it beats and looks for the dead.
        await aiohttp_client(create_app(settings, clock=RunningClock(6.0)))
        heard = await asyncio.gather(
            everything_heard(therapist, 4.0), everything_heard(patient, 4.0)
        )
        assert list(heard) == [[], []]
    finally:
        await sockets.close()
