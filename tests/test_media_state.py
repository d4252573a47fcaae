"""``media-state``: each participant tells the other what it sends (camera
and microphone on, switched off, missing, blocked or busy), through the real
server (docs/protocol.md, "Messages")."""

from __future__ import annotations

import pytest

from signaling.protocol import ErrorCode, ProtocolError, parse_inbound
from tests.support.harness import Harness, Sockets, admitted_pair, new_consult, receive

pytestmark = pytest.mark.signaling_backends

NO_DEVICES = {"v": 1, "type": "media-state", "camera": "missing", "microphone": "blocked"}


async def test_a_patients_media_state_reaches_the_therapist_with_its_sender(
    harness: Harness, sockets: Sockets
) -> None:
    _setup, therapist, patient = await admitted_pair(harness, sockets)
    await patient.send_json(NO_DEVICES)
    relayed = await receive(therapist, "media-state")
    assert relayed == {**NO_DEVICES, "sender": "patient"}
    # And the other way: the therapist muted, camera off.
    await therapist.send_json({"v": 1, "type": "media-state", "camera": "off", "microphone": "off"})
    told = await receive(patient, "media-state")
    assert (told["camera"], told["microphone"], told["sender"]) == ("off", "off", "therapist")


async def test_a_media_state_before_admission_is_refused_and_the_socket_goes_on(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness)
    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    patient = await sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    await patient.send_json(NO_DEVICES)
    error = await receive(patient, "error")
    assert (error["code"], error["ref"]) == ("not_admitted", "media-state")
    await patient.send_json({"v": 1, "type": "ping"})
    await receive(patient, "pong")


@pytest.mark.parametrize(
    ("frame", "named"),
    [
        ('{"v":1,"type":"media-state","camera":"broken","microphone":"on"}', "camera"),
        ('{"v":1,"type":"media-state","camera":"on"}', "microphone"),
        ('{"v":1,"type":"media-state","camera":"on","microphone":"on","name":"x"}', "name"),
    ],
)
def test_a_malformed_media_state_is_refused_naming_the_field(frame: str, named: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        parse_inbound(frame)
    assert raised.value.code is ErrorCode.INVALID_MESSAGE
    assert repr(named) in raised.value.message
    assert raised.value.ref == "media-state"
