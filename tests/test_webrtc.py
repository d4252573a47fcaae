"""Real WebRTC peers through our signaling: media flows, and flows again after a reconnect.

Two aiortc peer connections in the test process play the therapist's and the
patient's browser. Each talks to the real server through its own ``/ws``
socket; the server only relays offer, answer and candidates. aiortc does not
trickle: ``setLocalDescription`` waits for ICE gathering to complete, so the
offer and the answer carry every candidate. Relayed ``candidate`` messages are
still applied when they come, as a browser peer would send them.

On this machine aioice does not gather 127.0.0.1, so the two peers meet over
the host's other interface. ``RTCConfiguration(iceServers=[])`` is always
passed: without it aiortc asks a public STUN server, and there is no internet.
"""

from __future__ import annotations

import contextlib

import pytest

from tests.support.harness import Harness, Sockets, consult_row, new_consult, receive
from tests.support.webrtc import (
    Peer,
    Signaller,
    all_receive_media,
    opened,
)

# Each harness test runs on the in-process broker and on the real Redis.
pytestmark = [pytest.mark.signaling_backends, pytest.mark.webrtc]


async def test_therapist_and_patient_exchange_media_through_our_signaling(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness, display_name="Mevr. J.")
    therapist_socket = await sockets.therapist(setup.consult_id)
    await receive(therapist_socket, "welcome")
    patient_socket = await sockets.patient(setup.invite_token)
    assert (await receive(patient_socket, "welcome"))["state"] == "waiting"
    await receive(therapist_socket, "patient-waiting")

    async with contextlib.AsyncExitStack() as stack:
        therapist = opened(stack, Peer("therapist"))
        patient = opened(stack, Peer("patient"))
        therapist_signals = opened(stack, Signaller(therapist_socket, therapist))
        patient_signals = opened(stack, Signaller(patient_socket, patient))

        await therapist_signals.send("admit")
        await patient_signals.expect("admitted")
        assert (await therapist_signals.expect("peer-joined"))["role"] == "patient"
        # The therapist's client always makes the offer; the patient's pump answers it.
        await therapist_signals.send("offer", sdp=await therapist.offer())

        await all_receive_media(therapist, patient)
        assert therapist.pc.connectionState == "connected"
        assert patient.pc.connectionState == "connected"
        therapist_signals.assert_nothing_unexpected()
        patient_signals.assert_nothing_unexpected()


async def test_after_the_patient_reconnects_an_ice_restart_brings_media_back(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness)
    therapist_socket = await sockets.therapist(setup.consult_id)
    await receive(therapist_socket, "welcome")
    patient_socket = await sockets.patient(setup.invite_token)
    await receive(patient_socket, "welcome")
    await receive(therapist_socket, "patient-waiting")

    async with contextlib.AsyncExitStack() as stack:
        therapist = opened(stack, Peer("therapist"))
        patient = opened(stack, Peer("patient"))
        therapist_signals = opened(stack, Signaller(therapist_socket, therapist))
        patient_signals = opened(stack, Signaller(patient_socket, patient))
        await therapist_signals.send("admit")
        await patient_signals.expect("admitted")
        await therapist_signals.expect("peer-joined")
        await therapist_signals.send("offer", sdp=await therapist.offer())
        await all_receive_media(therapist, patient)
        started_at = (await consult_row(harness, setup.consult_id)).started_at
        assert started_at is not None

        # The patient's page reloads: its socket and its peer connection are gone.
        await patient_signals.close()
        await patient.close()
        reconnecting = await therapist_signals.expect("peer-reconnecting")
        assert reconnecting["role"] == "patient"
        harness.clock.advance(10)  # well within the grace period

        patient_again = opened(stack, Peer("patient, reconnected"))
        reconnected_socket = await sockets.patient(setup.invite_token)
        patient_signals_again = opened(stack, Signaller(reconnected_socket, patient_again))
        welcome = await patient_signals_again.expect("welcome")
        assert welcome["state"] == "active"
        assert welcome["peer_present"] is True
        assert (await therapist_signals.expect("peer-rejoined"))["role"] == "patient"

        # The therapist restarts ICE with a new offer. aiortc's restartIce support
        # is limited, so the therapist's client offers from a new peer connection
        # (what a reloaded browser does too); the old one is closed. Counting on
        # the new peer connections counts only frames received after the reconnect.
        therapist_again = opened(stack, Peer("therapist, after the rejoin"))
        therapist_signals.peer = therapist_again
        await therapist.close()
        await therapist_signals.send("offer", sdp=await therapist_again.offer())

        await all_receive_media(therapist_again, patient_again)
        assert therapist_again.pc.connectionState == "connected"
        assert patient_again.pc.connectionState == "connected"
        assert (await consult_row(harness, setup.consult_id)).started_at == started_at
        therapist_signals.assert_nothing_unexpected()
        patient_signals_again.assert_nothing_unexpected()
