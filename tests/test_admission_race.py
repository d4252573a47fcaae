"""Admission against the first relay: the therapist's page offers the moment it
hears ``peer-joined``, while the patient's socket may still be opening (issue 19:
an outside load generator saw a first offer after admission that never arrived).

The window is widened on purpose: the patient's socket is held between joining
the room and sending its first messages, and the admission and the first offer
happen inside that hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from server.ws.outbox import Outbox
from tests.support.harness import Harness, Sockets, new_consult, receive

# On the in-process broker (SQLite, PostgreSQL) and on the real Redis.
pytestmark = pytest.mark.signaling_backends

OFFER = {"v": 1, "type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\n"}
CANDIDATE = {"v": 1, "type": "candidate", "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"}


class Held:
    """The patient's socket held after it joined, before its first messages go out."""

    def __init__(self) -> None:
        self.joined = asyncio.Event()
        self.go_on = asyncio.Event()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[Held]:
    hold = Held()
    opening = Outbox.open

    async def held_open(outbox: Outbox, first: list[dict[str, Any]]) -> None:
        if first and first[0].get("role") == "patient":
            hold.joined.set()
            await hold.go_on.wait()
        await opening(outbox, first)

    monkeypatch.setattr(Outbox, "open", held_open)
    yield hold
    hold.go_on.set()


async def test_a_first_offer_made_while_the_patients_socket_opens_arrives_after_admitted(
    harness: Harness, sockets: Sockets, held: Held
) -> None:
    setup = await new_consult(harness)
    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    patient = await sockets.patient(setup.invite_token)
    await asyncio.wait_for(held.joined.wait(), 5)

    # Inside the hold: the therapist hears of the patient, admits, and offers at once.
    await receive(therapist, "patient-waiting")
    await therapist.send_json({"v": 1, "type": "admit"})
    await receive(therapist, "peer-joined")
    await therapist.send_json(OFFER)
    await therapist.send_json(CANDIDATE)
    await asyncio.sleep(0.05)  # let the relay run while the hold lasts
    held.go_on.set()

    kinds = []
    for _ in range(4):
        message = await patient.receive_json(timeout=5)
        kinds.append(message["type"])
        if message["type"] == "offer":
            assert message["sdp"] == OFFER["sdp"]
            assert message["sender"] == "therapist"
    assert kinds == ["welcome", "admitted", "offer", "candidate"]


async def test_many_admissions_at_once_each_get_their_first_offer(
    harness: Harness, sockets: Sockets
) -> None:
    # A small storm: every patient arrives at once, every therapist admits on
    # patient-waiting and offers on peer-joined; no offer may go missing.
    setups = [await new_consult(harness)]
    for _ in range(11):
        response = await harness.post("/api/consults", {})
        created = await response.json()
        setups.append(
            replace(
                setups[0], consult_id=created["consult"]["id"], invite_token=created["invite_token"]
            )
        )
    therapists = [await sockets.therapist(setup.consult_id) for setup in setups]
    for therapist in therapists:
        await receive(therapist, "welcome")

    async def arrive(index: int) -> list[str]:
        patient = await sockets.patient(setups[index].invite_token)
        therapist = therapists[index]
        await receive(therapist, "patient-waiting")
        await therapist.send_json({"v": 1, "type": "admit"})
        await receive(therapist, "peer-joined")
        await therapist.send_json(OFFER)
        return [(await patient.receive_json(timeout=10))["type"] for _ in range(3)]

    seen = await asyncio.gather(*(arrive(k) for k in range(len(setups))))
    assert seen == [["welcome", "admitted", "offer"]] * len(setups)
