"""Clients that send a request slowly, or never finish it (slowloris), are
cut off after server.request_timeout_s: headers on the real server (the
``serve`` command), a JSON body in the app."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.support.harness import Harness
from tests.support.processes import ServerProcess

TIMEOUT_S = 2


async def trickle_headers(port: int, *, for_s: float) -> float:
    """Send a request's headers a byte every 0.2 s; return when the server
    closed the connection (seconds after the first byte), or ``for_s``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
        for byte in head:
            if reader.at_eof():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1024), timeout=0.2) == b"":
                    break
            except TimeoutError:
                pass
            if time.monotonic() - started > for_s:
                break
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started


@pytest.mark.multinode
async def test_the_server_closes_a_connection_whose_headers_never_end(
    data_dir: Path, free_port: int, tmp_path: Path
) -> None:
    server = ServerProcess(
        data_dir, free_port, tmp_path / "server.log", settings={"server_request_timeout_s": "2"}
    )
    try:
        await asyncio.to_thread(server.wait_healthy)
        closed_after = await trickle_headers(free_port, for_s=TIMEOUT_S + 8)
        assert closed_after < TIMEOUT_S + 3, f"still open after {closed_after:.1f} s"
    finally:
        server.stop()


@pytest.mark.settings(server_request_timeout_s=1)
async def test_a_body_that_never_arrives_gets_408(harness: Harness) -> None:
    server = harness.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(
            b"POST /api/login HTTP/1.1\r\n"
            + f"Host: {server.host}:{server.port}\r\n".encode()
            + f"Origin: {harness.headers['Origin']}\r\n".encode()
            + b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"email":'
        )
        await writer.drain()
        started = time.monotonic()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        waited = time.monotonic() - started
    finally:
        writer.close()
    assert status_line.split()[1] == b"408", status_line
    assert waited < 5
