"""Many participants arriving at once on the embedded SQLite default."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.harness import Harness, Sockets, new_consult, receive

# Each harness test runs on the in-process broker and on the real Redis.
pytestmark = pytest.mark.signaling_backends


async def test_many_patients_getting_tickets_and_connecting_at_once(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    setups = [
        await new_consult(sqlite_harness, email=f"t{n}@praktijk-noord.example") for n in range(2)
    ]
    # One therapist logged in last; its consult gets 32 patients' tickets at once.
    setup = setups[-1]

    async def patient() -> str:
        socket = await sqlite_sockets.patient(setup.invite_token)
        welcome = await receive(socket, "welcome")
        return str(welcome["state"])

    async def therapist() -> str:
        socket = await sqlite_sockets.therapist(setup.consult_id)
        return str((await receive(socket, "welcome"))["state"])

    states = await asyncio.gather(
        *(patient() for _ in range(48)), *(therapist() for _ in range(16))
    )
    assert states == ["waiting"] * 64
