"""Many participants arriving at once on the embedded SQLite default."""

from __future__ import annotations

import asyncio

import pytest

from signaling.tickets import MAX_TICKETS_PER_INVITE
from tests.support.harness import ConsultSetup, Harness, Sockets, new_consult, receive

# Each harness test runs on the in-process broker and on the real Redis.
pytestmark = pytest.mark.signaling_backends


async def test_many_patients_getting_tickets_and_connecting_at_once(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    await new_consult(sqlite_harness, email="t0@praktijk-noord.example")
    # One therapist logged in last, with ten consults. An invite holds at most
    # MAX_TICKETS_PER_INVITE live tickets (a sixth evicts the oldest, by
    # design), so the 48 patients come through the ten invites, five each at
    # most; all 64 sockets still arrive at once.
    first = await new_consult(sqlite_harness, email="t1@praktijk-noord.example")
    setups = [first]
    while len(setups) < 10:
        response = await sqlite_harness.post("/api/consults", {})
        assert response.status == 201, await response.text()
        created = await response.json()
        setups.append(
            ConsultSetup(first.therapist, created["consult"]["id"], created["invite_token"])
        )
    assert len(setups) * MAX_TICKETS_PER_INVITE >= 48

    async def patient(setup: ConsultSetup) -> str:
        socket = await sqlite_sockets.patient(setup.invite_token)
        welcome = await receive(socket, "welcome")
        return str(welcome["state"])

    async def therapist(setup: ConsultSetup) -> str:
        socket = await sqlite_sockets.therapist(setup.consult_id)
        return str((await receive(socket, "welcome"))["state"])

    states = await asyncio.gather(
        *(patient(setups[n % len(setups)]) for n in range(48)),
        *(therapist(setups[n % len(setups)]) for n in range(16)),
    )
    assert states == ["waiting"] * 64
