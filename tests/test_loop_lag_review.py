"""The loop's watcher under load, found in review of 2e8ff60 (each failing
before the fix): one long callback followed by the reads it delayed is still
said held, and named (uvloop handles the delayed reads before the watcher's
question); an overload in the first stall is said busy; and no callback's
frame, with a patient's data in its locals, is kept once it returned."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import weakref
from collections.abc import MutableMapping
from typing import Any

import uvloop
from structlog.testing import capture_logs

from server.loop_lag import LoopLag
from tests.test_loop_lag import hold_the_loop, short_work, stalls_reported


class Parser(asyncio.Protocol):
    """A connection whose message takes a little work to read (a WebSocket frame)."""

    def data_received(self, data: bytes) -> None:
        time.sleep(0.003)


def test_a_hold_followed_by_the_messages_it_delayed_is_named_held_on_uvloop() -> None:
    """On uvloop (the production loop) the socket reads that arrived while a
    callback held the loop all run before the watcher's question is answered
    (libuv's poll phase comes before the ready callbacks). Sixty connections
    with one message each after an 800 ms hold: the watcher samples a few
    of those reads, counts more than one callback and says 'event loop busy'
    without naming the code that held the loop for 800 ms, which is exactly
    the warning's purpose. (asyncio's own loop answers before those reads and
    says 'held', naming hold_the_loop.)"""

    async def main() -> list[MutableMapping[str, Any]]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Parser, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
        await asyncio.sleep(0.2)
        watcher = LoopLag(warn_after_s=0.05, probe_s=0.01)
        watcher.start()
        await asyncio.sleep(0.2)

        def send() -> None:
            time.sleep(0.15)  # while the loop is held
            for client in clients:
                client.sendall(b"m")

        sender = threading.Thread(target=send)
        try:
            with capture_logs() as logs:
                sender.start()
                loop.call_soon(hold_the_loop, 0.8)
                await asyncio.sleep(0)
                await stalls_reported(watcher, 1)
        finally:
            sender.join()
            await asyncio.to_thread(watcher.stop)
            for client in clients:
                client.close()
            server.close()
        return [entry for entry in logs if entry["event"].startswith("event loop")]

    logs = uvloop.run(main())
    first = logs[0]
    assert first["event"] == "event loop held", (
        f"an 800 ms hold by one callback, then the reads it delayed, is reported as {first}"
    )
    assert first["where"][-1].endswith(" hold_the_loop"), first


async def test_an_overload_in_the_first_stall_is_said_busy_too() -> None:
    """Before the loop has answered any question the watcher does not know
    where a callback starts, notes nothing, and always says 'held', naming
    whichever short callback ran at that moment: the very misattribution the
    commit set out to end. The watcher starts first among the server's
    resources, so a stall at start-up (or a storm of reconnects queued while
    the server restarted) is the first one."""
    loop = asyncio.get_running_loop()
    watcher = LoopLag(warn_after_s=0.05, probe_s=0.01)
    try:
        with capture_logs() as logs:
            watcher.start()
            # 0.4 s of work, in 5 ms pieces, ahead of the watcher's first question.
            for _ in range(80):
                loop.call_soon(short_work, 0.005)
            await asyncio.sleep(0)
            await stalls_reported(watcher, 1)
    finally:
        await asyncio.to_thread(watcher.stop)
    said = [entry for entry in logs if entry["event"].startswith("event loop")]
    assert said[0]["event"] == "event loop busy", (
        f"80 callbacks of 5 ms in the first stall reported as {said[0]}"
    )


class Secret:
    """What a request's handler holds for a moment: a patient's data."""

    def __init__(self, text: str) -> None:
        self.text = text


async def test_the_watcher_keeps_no_finished_callbacks_frames_and_their_locals_alive() -> None:
    """While the loop is busy the watcher keeps every distinct callback frame
    it sampled (to tell them apart by identity) until the loop answers: each
    finished callback's locals (a patient's data), its Handle and arguments
    (through f_back) stay in memory for the whole overload, one more every
    probe pause, with no bound. Telling 'more than one' needs at most two."""
    loop = asyncio.get_running_loop()
    secrets: list[weakref.ref[Secret]] = []
    most_alive = 0

    def handle(i: int) -> None:
        secret = Secret(f"patient {i}")  # a local only
        secrets.append(weakref.ref(secret))
        time.sleep(0.005)

    def count() -> None:
        nonlocal most_alive
        alive = sum(1 for secret in secrets if secret() is not None)
        most_alive = max(most_alive, alive)

    watcher = LoopLag(warn_after_s=0.05, probe_s=0.01)
    watcher.start()
    try:
        await asyncio.sleep(0.1)
        with capture_logs():
            # A second of work in 5 ms pieces; every tenth callback counts
            # the secrets of the callbacks that have returned.
            for i in range(200):
                loop.call_soon(handle, i)
                if i % 10 == 9:
                    loop.call_soon(count)
            await asyncio.sleep(0)
            await stalls_reported(watcher, 1)
    finally:
        await asyncio.to_thread(watcher.stop)
    assert most_alive <= 2, (
        f"{most_alive} returned callbacks' locals were still alive, held by the watcher's frames"
    )
