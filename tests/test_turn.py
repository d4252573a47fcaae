"""TURN: credentials from our welcome message work against a real coturn, expired ones do not."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)

from server import create_app
from signaling.turn import ice_servers, turn_credentials
from tests.support.harness import Harness, Sockets, new_consult, receive
from tests.support.ports import unused_port
from tests.support.services import service_unavailable
from tests.support.settings import SettingsFactory

pytestmark = pytest.mark.webrtc

SECRET = "test-turn-secret-0123456789"


@dataclass(frozen=True)
class Coturn:
    port: int

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Coturn]:
    """A real coturn on 127.0.0.1 with use-auth-secret, started for this test."""
    binary = shutil.which("turnserver")
    if binary is None:
        service_unavailable("coturn", "the turnserver binary is not installed (Debian: coturn)")
    port = unused_port()
    config = tmp_path / "turnserver.conf"
    config.write_text(
        "\n".join(
            [
                "listening-ip=127.0.0.1",
                f"listening-port={port}",
                "relay-ip=127.0.0.1",
                # Both test peers live on this host: relaying to loopback is the point here.
                "allow-loopback-peers",
                "min-port=49300",
                "max-port=49400",
                "use-auth-secret",
                f"static-auth-secret={SECRET}",
                "realm=videoconsult.test",
                "fingerprint",
                "no-tls",
                "no-dtls",
                "no-cli",
                "no-multicast-peers",
                f"pidfile={tmp_path / 'turnserver.pid'}",
                f"log-file={tmp_path / 'turnserver.log'}",
                "simple-log",
            ]
        )
        + "\n"
    )
    process = subprocess.Popen(
        [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None:
                service_unavailable("coturn", f"turnserver exited with {process.returncode}")
            time.sleep(0.1)
        else:
            service_unavailable("coturn", f"turnserver did not listen on {port} within 10 s")
        yield Coturn(port)
    finally:
        process.terminate()
        process.wait(timeout=10)


def configuration(servers: list[dict[str, Any]]) -> RTCConfiguration:
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in servers
        ],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )


def test_turn_credentials_have_the_rest_api_form() -> None:
    now = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    username, password = turn_credentials("s3cret", "abc", now=now, ttl_s=600)
    assert username == f"{int(now.timestamp()) + 600}:abc"
    # Known answer: base64(HMAC-SHA1("s3cret", username)).
    import base64
    import hashlib
    import hmac

    expected = base64.b64encode(hmac.new(b"s3cret", username.encode(), hashlib.sha1).digest())
    assert password == expected.decode()


async def test_welcome_hands_out_turn_servers_with_short_lived_credentials(
    make_settings: SettingsFactory, clock: Any, aiohttp_client: Any
) -> None:
    app = create_app(
        make_settings(
            turn_turn_urls=(
                "turn:turn.example:3478?transport=udp, turns:turn.example:443?transport=tcp"
            ),
            turn_stun_urls="stun:turn.example:3478",
            turn_secret=SECRET,
            turn_credential_ttl_s=600,
        ),
        clock=clock,
    )
    harness = Harness(app, await aiohttp_client(app), clock)
    sockets = Sockets(harness)
    try:
        setup = await new_consult(harness)
        socket_ = await sockets.therapist(setup.consult_id)
        welcome = await receive(socket_, "welcome")
    finally:
        await sockets.close()
    stun, turn = welcome["ice_servers"]
    assert stun == {"urls": ["stun:turn.example:3478"]}
    assert turn["urls"] == [
        "turn:turn.example:3478?transport=udp",
        "turns:turn.example:443?transport=tcp",
    ]
    expiry, pseudonym = turn["username"].split(":")
    assert int(expiry) == int(clock.now().timestamp()) + 600
    assert pseudonym == welcome["connection"]  # pseudonymous: no name, no account id
    assert SECRET not in str(welcome)


async def gather_relay_candidates(servers: list[dict[str, Any]]) -> list[str]:
    """Gather ICE candidates with relay-only policy; return the relay candidate lines."""
    pc = RTCPeerConnection(configuration(servers))
    try:
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        return [line for line in pc.localDescription.sdp.splitlines() if "typ relay" in line]
    finally:
        await pc.close()


async def test_call_connects_through_coturn_with_relay_only_and_our_credentials(
    coturn: Coturn,
) -> None:
    now = datetime.now(UTC)
    servers = ice_servers(
        stun_urls=[], turn_urls=[coturn.url], secret=SECRET, pseudonym="t1", now=now, ttl_s=600
    )
    caller = RTCPeerConnection(configuration(servers))
    callee = RTCPeerConnection(configuration(servers))
    opened = asyncio.Event()
    received: list[str] = []
    try:
        channel = caller.createDataChannel("check")

        @callee.on("datachannel")
        def on_channel(incoming: Any) -> None:
            @incoming.on("message")
            def on_message(message: str) -> None:
                received.append(message)
                opened.set()

        @channel.on("open")
        def on_open() -> None:
            channel.send("through the relay")

        await caller.setLocalDescription(await caller.createOffer())
        assert "typ relay" in caller.localDescription.sdp
        assert "typ host" not in caller.localDescription.sdp
        await callee.setRemoteDescription(
            RTCSessionDescription(caller.localDescription.sdp, "offer")
        )
        await callee.setLocalDescription(await callee.createAnswer())
        await caller.setRemoteDescription(
            RTCSessionDescription(callee.localDescription.sdp, "answer")
        )
        await asyncio.wait_for(opened.wait(), 20)
        assert received == ["through the relay"]
        assert caller.iceConnectionState == "completed" or caller.connectionState == "connected"
    finally:
        await caller.close()
        await callee.close()


async def test_expired_credentials_are_refused_by_coturn(coturn: Coturn) -> None:
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    expired = ice_servers(
        stun_urls=[], turn_urls=[coturn.url], secret=SECRET, pseudonym="t2", now=long_ago, ttl_s=600
    )
    fresh = ice_servers(
        stun_urls=[],
        turn_urls=[coturn.url],
        secret=SECRET,
        pseudonym="t3",
        now=datetime.now(UTC),
        ttl_s=600,
    )
    wrong_secret = ice_servers(
        stun_urls=[],
        turn_urls=[coturn.url],
        secret="not-the-secret",
        pseudonym="t4",
        now=datetime.now(UTC),
        ttl_s=600,
    )
    assert await gather_relay_candidates(fresh)  # the same server allocates for good ones
    assert await gather_relay_candidates(expired) == []
    assert await gather_relay_candidates(wrong_secret) == []
