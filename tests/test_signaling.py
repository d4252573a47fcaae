"""The signaling socket: waiting room, admission, relay, reconnects, limits, authorization."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import ClientWebSocketResponse, WSMsgType

from audit.accounts import Role
from audit.schema import consults
from server.app_keys import DB_ENGINE, ROOMS
from server.housekeeping import purge_expired
from signaling.protocol import MAX_FRAME_BYTES
from tests.support.harness import (
    Harness,
    Sockets,
    admitted_pair,
    consult_row,
    new_consult,
    receive,
    waiting_pair,
)

# Each harness test runs on the in-process broker and on the real Redis.
pytestmark = pytest.mark.signaling_backends

OFFER = {"v": 1, "type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\n"}


async def closed_with(socket: ClientWebSocketResponse) -> int:
    """The close code the server sent (what a browser's CloseEvent reports)."""
    message = await socket.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE, message
    code: int = message.data
    return code


async def test_waiting_room_then_admission_starts_the_consult(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness, display_name="Mevr. J.")
    therapist = await sockets.therapist(setup.consult_id)
    welcome = await receive(therapist, "welcome")
    assert welcome["state"] == "waiting"
    assert welcome["peer_present"] is False
    assert welcome["ice_servers"] == []

    patient = await sockets.patient(setup.invite_token)
    patient_welcome = await receive(patient, "welcome")
    assert patient_welcome["role"] == "patient"
    assert patient_welcome["consult"] == setup.consult_id
    waiting = await receive(therapist, "patient-waiting")
    assert waiting["display_name"] == "Mevr. J."
    assert (await consult_row(harness, setup.consult_id)).started_at is None

    harness.clock.advance(5)
    await therapist.send_json({"v": 1, "type": "admit"})
    await receive(patient, "admitted")
    assert (await receive(therapist, "peer-joined"))["role"] == "patient"
    row = await consult_row(harness, setup.consult_id)
    assert row.status == "active"
    assert row.started_at == harness.clock.now()


async def test_a_waiting_patient_hears_when_the_therapist_comes_and_goes(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness)
    patient = await sockets.patient(setup.invite_token)
    welcome = await receive(patient, "welcome")
    assert (welcome["state"], welcome["peer_present"]) == ("waiting", False)

    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    await receive(therapist, "patient-waiting")
    here = await receive(patient, "peer-presence")
    assert (here["role"], here["present"]) == ("therapist", True)

    # A second tab of the therapist's replaces the first: still there.
    second = await sockets.therapist(setup.consult_id)
    await receive(second, "welcome")
    await receive(therapist, "replaced")
    await patient.send_json({"v": 1, "type": "ping"})
    await receive(patient, "pong")

    await second.close()
    gone = await receive(patient, "peer-presence")
    assert (gone["role"], gone["present"]) == ("therapist", False)

    # Back again, and the patient is admitted as before.
    again = await sockets.therapist(setup.consult_id)
    await receive(again, "welcome")
    await receive(again, "patient-waiting")
    assert (await receive(patient, "peer-presence"))["present"] is True
    await again.send_json({"v": 1, "type": "admit"})
    await receive(patient, "admitted")


async def test_offer_answer_and_candidates_are_relayed_between_the_two(
    harness: Harness, sockets: Sockets
) -> None:
    _setup, therapist, patient = await admitted_pair(harness, sockets)
    await therapist.send_json(OFFER)
    offer = await receive(patient, "offer")
    assert offer["sdp"] == OFFER["sdp"]
    assert offer["sender"] == "therapist"
    await patient.send_json({"v": 1, "type": "answer", "sdp": "v=0\r\n"})
    assert (await receive(therapist, "answer"))["sender"] == "patient"
    candidate = {
        "v": 1,
        "type": "candidate",
        "candidate": "candidate:1 1 udp 2122260223 192.0.2.1 54400 typ host",
        "sdpMid": "0",
        "sdpMLineIndex": 0,
    }
    await patient.send_json(candidate)
    relayed = await receive(therapist, "candidate")
    assert relayed["candidate"] == candidate["candidate"]
    assert relayed["sdpMLineIndex"] == 0


async def test_relay_before_admission_is_refused_and_the_socket_goes_on(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness)
    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    patient = await sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    await patient.send_json(OFFER)
    error = await receive(patient, "error")
    assert error["code"] == "not_admitted"
    assert error["ref"] == "offer"
    await patient.send_json({"v": 1, "type": "ping"})
    await receive(patient, "pong")


async def test_patient_cannot_admit_deny_or_end(harness: Harness, sockets: Sockets) -> None:
    setup = await new_consult(harness)
    patient = await sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    for kind in ("admit", "deny", "end"):
        await patient.send_json({"v": 1, "type": kind})
        error = await receive(patient, "error")
        assert error["code"] == "not_allowed"
        assert error["ref"] == kind


async def test_denied_patient_is_told_and_disconnected(harness: Harness, sockets: Sockets) -> None:
    setup, therapist, patient = await waiting_pair(harness, sockets)
    await therapist.send_json({"v": 1, "type": "deny"})
    await receive(patient, "denied")
    assert await closed_with(patient) == 4003
    assert (await consult_row(harness, setup.consult_id)).started_at is None


async def test_therapist_ends_the_consult_for_both_and_only_metadata_is_kept(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    harness.clock.advance(25 * 60 + 7)
    await therapist.send_json({"v": 1, "type": "end"})
    for socket in (therapist, patient):
        ended = await receive(socket, "consult-ended")
        assert ended["reason"] == "ended_by_therapist"
        assert await closed_with(socket) == 4004
    row = await consult_row(harness, setup.consult_id)
    assert row.status == "ended"
    assert row.duration_s == 25 * 60 + 7
    assert row.ended_at - row.started_at == harness.clock.now() - row.started_at
    # The invite went with the end: nothing of it is left, so its link is
    # unknown (the page that joined with it says the consult has ended).
    gone = await harness.client.get(f"/api/invites/{setup.invite_token}")
    assert gone.status == 404
    assert (await gone.json())["error"]["code"] == "invite_unknown"


async def test_patient_reconnects_within_grace_and_the_start_stays(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    started = (await consult_row(harness, setup.consult_id)).started_at
    await patient.close()
    reconnecting = await receive(therapist, "peer-reconnecting")
    assert reconnecting["role"] == "patient"
    assert reconnecting["grace_s"] == 30
    harness.clock.advance(20)
    await harness.app[ROOMS].fire_due_timers()

    again = await sockets.patient(setup.invite_token)
    welcome = await receive(again, "welcome")
    assert welcome["state"] == "active"
    assert welcome["peer_present"] is True
    assert (await receive(therapist, "peer-rejoined"))["role"] == "patient"
    harness.clock.advance(20)
    assert await harness.app[ROOMS].fire_due_timers() == 0  # the grace timer was cancelled
    await therapist.send_json(OFFER)  # the therapist restarts ICE with a new offer
    assert (await receive(again, "offer"))["sender"] == "therapist"
    assert (await consult_row(harness, setup.consult_id)).started_at == started


async def test_after_the_grace_period_the_other_side_is_told_the_peer_left(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    await patient.close()
    await receive(therapist, "peer-reconnecting")
    harness.clock.advance(31)
    assert await harness.app[ROOMS].fire_due_timers() == 1
    assert (await receive(therapist, "peer-left"))["role"] == "patient"
    assert (await consult_row(harness, setup.consult_id)).status == "active"
    harness.clock.advance(60)  # past any claim on the timer: done is done
    assert await harness.app[ROOMS].fire_due_timers() == 0
    await therapist.send_json({"v": 1, "type": "bye"})
    await receive(therapist, "consult-ended")
    row = await consult_row(harness, setup.consult_id)
    assert row.status == "ended"


async def wait_until_reconnecting(harness: Harness, consult_id: str, role: str) -> None:
    """The server handles a client's close asynchronously: wait until it has."""
    store = harness.app[ROOMS]._store
    for _ in range(200):
        state = await store.peek(uuid.UUID(consult_id))
        assert state is not None
        presence = state.therapist if role == "therapist" else state.patient
        if presence is not None and not presence.connected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the server never saw the {role} go")


async def test_both_gone_past_grace_ends_the_consult_when_the_last_one_left(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    harness.clock.advance(60)
    await patient.close()
    await receive(therapist, "peer-reconnecting")
    harness.clock.advance(25)
    await therapist.close()
    await wait_until_reconnecting(harness, setup.consult_id, "therapist")
    harness.clock.advance(6)  # the patient's grace is over, the therapist's is not
    await harness.app[ROOMS].fire_due_timers()
    assert (await consult_row(harness, setup.consult_id)).status == "active"
    harness.clock.advance(25)  # now the therapist's is over too
    await harness.app[ROOMS].fire_due_timers()
    row = await consult_row(harness, setup.consult_id)
    assert row.status == "ended"
    assert row.duration_s == 60 + 25  # until the last one went, not the end of the grace


async def test_a_grace_timer_handed_out_again_finishes_an_end_left_undone(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    consult_id = uuid.UUID(setup.consult_id)
    rooms = harness.app[ROOMS]
    await patient.close()
    await receive(therapist, "peer-reconnecting")
    await therapist.close()
    await wait_until_reconnecting(harness, setup.consult_id, "therapist")
    # What a node that died half-way through the last grace period leaves:
    # both presences cleared and saved, the consult not ended; the timers
    # are handed out again once their claims run out.
    async with rooms._store.locked(consult_id) as state:
        assert state is not None
        state.therapist = state.patient = None
    harness.clock.advance(31)
    await rooms.fire_due_timers()
    row = await consult_row(harness, setup.consult_id)
    assert row.status == "ended"
    assert row.duration_s == 31


async def test_whoever_hears_of_a_drop_or_a_return_finds_the_room_changed(
    harness: Harness, sockets: Sockets
) -> None:
    # Found by the soak on Redis (docs/benchmarks.md, "Soak"): the rooms told
    # the other participant of a drop or a return before the room's new state
    # was saved, so a message sent at once was relayed on the old state: to
    # the closed socket, where it vanished (not refused with peer_absent), or
    # refused with peer_absent though the peer was back.
    setup, therapist, patient = await admitted_pair(harness, sockets)
    for _ in range(8):
        await patient.close()
        await receive(therapist, "peer-reconnecting")
        await therapist.send_json(OFFER)  # at once: the patient is away
        refused = await receive(therapist, "error")
        assert (refused["code"], refused["ref"]) == ("peer_absent", "offer")
        patient = await sockets.patient(setup.invite_token)
        await receive(patient, "welcome")
        await receive(therapist, "peer-rejoined")
        await therapist.send_json(OFFER)  # at once: the patient is back
        assert (await receive(patient, "offer"))["sender"] == "therapist"


async def test_a_bye_while_the_other_is_away_ends_the_consult_at_the_bye(
    harness: Harness, sockets: Sockets
) -> None:
    # Found by the protocol fuzz (tests/test_signaling_fuzz.py): the end was
    # recorded when the patient dropped, not when the therapist, the last to
    # go, said bye.
    setup, therapist, patient = await admitted_pair(harness, sockets)
    harness.clock.advance(60)
    await patient.close()
    await receive(therapist, "peer-reconnecting")
    harness.clock.advance(10)
    await therapist.send_json({"v": 1, "type": "bye"})
    assert await closed_with(therapist) == 1000
    harness.clock.advance(30)  # the patient's grace period runs out: nobody is left
    await harness.app[ROOMS].fire_due_timers()
    row = await consult_row(harness, setup.consult_id)
    assert row.status == "ended"
    assert row.duration_s == 60 + 10


async def test_bye_closes_the_socket_so_a_new_one_alone_speaks_for_the_participant(
    harness: Harness, sockets: Sockets
) -> None:
    # Found by the protocol fuzz: after a bye the socket stayed open and
    # subscribed, and once the therapist came back both sockets received the
    # patient's messages (the older one was never replaced).
    setup, therapist, patient = await admitted_pair(harness, sockets)
    await therapist.send_json({"v": 1, "type": "bye"})
    assert await closed_with(therapist) == 1000
    assert (await receive(patient, "peer-left"))["role"] == "therapist"
    again = await sockets.therapist(setup.consult_id)
    welcome = await receive(again, "welcome")
    assert (welcome["state"], welcome["peer_present"]) == ("active", True)
    await receive(patient, "peer-rejoined")
    await patient.send_json({"v": 1, "type": "answer", "sdp": "v=0\r\n"})
    assert (await receive(again, "answer"))["sender"] == "patient"
    assert therapist.closed


async def test_maximum_duration_ends_the_consult(harness: Harness, sockets: Sockets) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    harness.clock.advance(3 * 3600)
    await harness.app[ROOMS].fire_due_timers()
    assert (await receive(therapist, "consult-ended"))["reason"] == "max_duration"
    assert (await receive(patient, "consult-ended"))["reason"] == "max_duration"
    assert (await consult_row(harness, setup.consult_id)).duration_s == 3 * 3600


async def test_same_link_on_a_second_device_replaces_the_first(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, laptop = await admitted_pair(harness, sockets)
    phone = await sockets.patient(setup.invite_token)
    assert (await receive(phone, "welcome"))["state"] == "active"
    await receive(laptop, "replaced")
    assert await closed_with(laptop) == 4001
    await receive(therapist, "peer-rejoined")
    await therapist.send_json(OFFER)
    await receive(phone, "offer")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ('{"v": 1, "type": "teleport"}', "unknown_type"),
        ('{"type": "ping"}', "unsupported_version"),
        ('{"v": 2, "type": "ping"}', "unsupported_version"),
        # Found by the protocol fuzz: JSON's true and 1.0 were taken for 1.
        ('{"v": true, "type": "ping"}', "unsupported_version"),
        ('{"v": 1.0, "type": "ping"}', "unsupported_version"),
        ('{"v": 1, "type": "offer", "sdp": 5}', "invalid_message"),
        ('{"v": 1, "type": "offer"}', "invalid_message"),
        ('{"v": 1, "type": "ping", "extra": true}', "invalid_message"),
        ('{"v": 1, "type": "candidate", "candidate": "x", "sdpMLineIndex": -1}', "invalid_message"),
        # The recording messages: wrong types, unknown values, too long.
        ('{"v": 1, "type": "record-consent"}', "invalid_message"),
        ('{"v": 1, "type": "record-consent", "agree": "yes"}', "invalid_message"),
        ('{"v": 1, "type": "record-consent", "agree": true, "by": "aunt"}', "invalid_message"),
        ('{"v": 1, "type": "record-consent", "agree": true, "request": ""}', "invalid_message"),
        (
            '{"v": 1, "type": "record-consent", "agree": true, "request": "' + "r" * 33 + '"}',
            "invalid_message",
        ),
        ('{"v": 1, "type": "record-request", "now": true}', "invalid_message"),
        ('{"v": 1, "type": "record-stop", "reason": "x"}', "invalid_message"),
        ('{"v": 1, "type": "recorder-offer"}', "invalid_message"),
        ('{"v": 1, "type": "recorder-offer", "sdp": ""}', "invalid_message"),
        (
            '{"v": 1, "type": "recorder-offer", "sdp": "' + "a" * (32 * 1024 + 1) + '"}',
            "invalid_message",
        ),
    ],
)
async def test_bad_messages_get_an_error_naming_the_problem_and_the_socket_goes_on(
    sqlite_harness: Harness, sqlite_sockets: Sockets, frame: str, code: str
) -> None:
    setup = await new_consult(sqlite_harness)
    therapist = await sqlite_sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    await therapist.send_str(frame)
    error = await receive(therapist, "error")
    assert error["code"] == code
    assert error["message"]
    await therapist.send_json({"v": 1, "type": "ping"})
    await receive(therapist, "pong")


async def test_a_message_for_another_consult_is_refused(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    setup = await new_consult(sqlite_harness)
    therapist = await sqlite_sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    await therapist.send_json({"v": 1, "type": "ping", "consult": str(uuid.uuid4())})
    assert (await receive(therapist, "error"))["code"] == "not_in_consult"
    # Found in review: its own id in capitals (as Swift's and .NET's UUIDs
    # print) was another consult too, where the API takes it as the same.
    own = str(setup.consult_id).upper()
    assert (await sqlite_harness.client.get(f"/api/consults/{own}")).status == 200
    await therapist.send_json({"v": 1, "type": "ping", "consult": own})
    await receive(therapist, "pong")


async def test_a_frame_of_64_kib_is_read_and_one_byte_more_closes_with_1009(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    # Found by the protocol fuzz: aiohttp's size limit is exclusive, so a
    # frame of exactly 64 KiB, which protocol.md allows, was closed with 1009.
    setup = await new_consult(sqlite_harness)
    therapist = await sqlite_sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    ping = json.dumps({"v": 1, "type": "ping"})
    at_the_limit = ping[:-1] + " " * (MAX_FRAME_BYTES - len(ping)) + "}"  # JSON's blanks
    assert len(at_the_limit.encode()) == MAX_FRAME_BYTES
    await therapist.send_str(at_the_limit)
    await receive(therapist, "pong")
    await therapist.send_str(" " + at_the_limit)
    assert await closed_with(therapist) == 1009


async def test_oversized_frames_close_the_socket_with_1009(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    setup = await new_consult(sqlite_harness)
    therapist = await sqlite_sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    await therapist.send_str(json.dumps({"v": 1, "type": "offer", "sdp": "x" * 70_000}))
    assert await closed_with(therapist) == 1009


async def test_a_flood_is_throttled_then_closed_with_1008(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    setup = await new_consult(sqlite_harness)
    therapist = await sqlite_sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    for _ in range(300):
        await therapist.send_json({"v": 1, "type": "ping"})
    codes = []
    while True:
        message = await therapist.receive(timeout=5)
        if message.type is WSMsgType.CLOSE:
            break
        codes.append(json.loads(message.data).get("code", message.data))
    assert "rate_limited" in codes
    assert message.data == 1008


async def test_garbage_does_not_disturb_another_consult(harness: Harness, sockets: Sockets) -> None:
    _setup, therapist, patient = await admitted_pair(harness, sockets)
    other = await new_consult(harness, email="other@praktijk-noord.example")
    noisy = await sockets.therapist(other.consult_id)
    await receive(noisy, "welcome")
    for _ in range(60):
        await noisy.send_str("garbage")
    await therapist.send_json(OFFER)
    assert (await receive(patient, "offer"))["sender"] == "therapist"
    await patient.send_json({"v": 1, "type": "ping"})
    await receive(patient, "pong")


async def test_sockets_need_authentication_and_our_origin(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    setup = await new_consult(sqlite_harness)
    session = await sqlite_sockets.session()
    anonymous = await session.get(f"/ws?consult={setup.consult_id}", headers=sqlite_harness.headers)
    assert anonymous.status == 401
    foreign = await sqlite_harness.client.get(
        f"/ws?consult={setup.consult_id}", headers={"Origin": "https://evil.example"}
    )
    assert foreign.status == 403
    no_origin = await sqlite_harness.client.get(f"/ws?consult={setup.consult_id}")
    assert no_origin.status == 403


async def test_a_ticket_works_once(sqlite_harness: Harness, sqlite_sockets: Sockets) -> None:
    setup = await new_consult(sqlite_harness)
    session = await sqlite_sockets.session()
    ticket = await sqlite_sockets.ticket(setup.invite_token, session)
    first = await session.ws_connect(f"/ws?ticket={ticket}", headers=sqlite_harness.headers)
    await receive(first, "welcome")
    await first.close()
    again = await session.get(f"/ws?ticket={ticket}", headers=sqlite_harness.headers)
    assert again.status == 401
    assert (await again.json())["error"]["code"] == "ticket_invalid"


async def test_a_revoked_invite_cannot_come_back(harness: Harness, sockets: Sockets) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    session = await sockets.session()
    spare_ticket = await sockets.ticket(setup.invite_token, session)
    revoked = await harness.client.delete(
        f"/api/consults/{setup.consult_id}/invite", headers=harness.headers
    )
    assert revoked.status == 204
    await patient.close()
    await receive(therapist, "peer-reconnecting")
    refused = await session.get(f"/ws?ticket={spare_ticket}", headers=harness.headers)
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "invite_revoked"
    status = await harness.client.get(f"/api/invites/{setup.invite_token}")
    assert status.status == 410
    assert "no longer valid" in (await status.json())["error"]["message"]


@pytest.mark.settings(consults_invite_validity_s=60)
async def test_an_admitted_patient_comes_back_after_the_invite_expired(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    harness.clock.advance(70)  # the link's validity is over; the consult runs
    await purge_expired(harness.app)  # keeps the invite of a running consult
    status = await harness.client.get(f"/api/invites/{setup.invite_token}")
    assert status.status == 200, await status.text()
    await patient.close()
    await receive(therapist, "peer-reconnecting")
    back = await sockets.patient(setup.invite_token)
    welcome = await receive(back, "welcome")
    assert welcome["state"] == "active"
    await receive(therapist, "peer-rejoined")
    # The therapist's revocation still wins over a running consult.
    revoked = await harness.client.delete(
        f"/api/consults/{setup.consult_id}/invite", headers=harness.headers
    )
    assert revoked.status == 204
    refused = await harness.client.get(f"/api/invites/{setup.invite_token}")
    assert (await refused.json())["error"]["code"] == "invite_revoked"


@pytest.mark.settings(consults_invite_validity_s=60)
async def test_a_waiting_patient_is_not_let_in_after_the_invite_expired(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await waiting_pair(harness, sockets)
    harness.clock.advance(70)
    await patient.close()
    await receive(therapist, "peer-left")
    expired = await harness.client.get(f"/api/invites/{setup.invite_token}")
    assert expired.status == 410
    assert (await expired.json())["error"]["code"] == "invite_expired"


async def test_a_patient_with_invite_a_cannot_reach_consult_b(
    harness: Harness, sockets: Sockets
) -> None:
    a = await new_consult(harness, email="a@praktijk-noord.example")
    harness.client.session.cookie_jar.clear()
    b = await new_consult(harness, email="b@praktijk-noord.example")
    b_therapist = await sockets.therapist(b.consult_id)
    await receive(b_therapist, "welcome")
    patient_a = await sockets.patient(a.invite_token)
    welcome = await receive(patient_a, "welcome")
    assert welcome["consult"] == a.consult_id
    await patient_a.send_json({"v": 1, "type": "ping", "consult": b.consult_id})
    assert (await receive(patient_a, "error"))["code"] == "not_in_consult"
    # Therapist B heard nothing of patient A.
    await b_therapist.send_json({"v": 1, "type": "ping"})
    await receive(b_therapist, "pong")


async def test_another_therapist_cannot_open_my_consults_socket_or_end_it(
    harness: Harness, sockets: Sockets
) -> None:
    mine = await new_consult(harness, email="mine@praktijk-noord.example")
    harness.client.session.cookie_jar.clear()
    await new_consult(harness, email="theirs@praktijk-noord.example")
    response = await harness.client.get(f"/ws?consult={mine.consult_id}", headers=harness.headers)
    assert response.status == 404
    api = await harness.post(f"/api/consults/{mine.consult_id}/end")
    assert api.status == 404
    assert (await consult_row(harness, mine.consult_id)).status == "created"


async def test_support_and_admin_cannot_join_a_consult(harness: Harness, sockets: Sockets) -> None:
    setup = await new_consult(harness)
    for role in (Role.SUPPORT, Role.ADMIN):
        harness.client.session.cookie_jar.clear()
        other = await harness.professional(f"{role.value}@praktijk-noord.example", role)
        await harness.logged_in(other)
        response = await harness.client.get(
            f"/ws?consult={setup.consult_id}", headers=harness.headers
        )
        assert response.status == 403


async def test_the_consult_table_holds_only_the_promised_metadata(harness: Harness) -> None:
    promised = {
        "id",
        "therapist_id",
        "created_at",
        "started_at",
        "ended_at",
        "duration_s",
        "status",
        # The appointment's time (issue 21): a time, not personal data.
        "scheduled_at",
    }
    assert {column.name for column in consults.columns} == promised

    def columns(sync: sa.Connection) -> set[str]:
        return {column["name"] for column in sa.inspect(sync).get_columns("consults")}

    async with harness.app[DB_ENGINE].connect() as conn:
        assert await conn.run_sync(columns) == promised


async def test_a_socket_that_fails_still_leaves_the_room(
    harness: Harness, sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    _setup, therapist, patient = await admitted_pair(harness, sockets)
    rooms = harness.app[ROOMS]
    real_handle = rooms.handle

    async def broken(participant: Any, message: Any, **options: Any) -> Any:
        if participant.role.value == "patient":
            raise ConnectionResetError("the write failed")
        return await real_handle(participant, message, **options)

    monkeypatch.setattr(rooms, "handle", broken)
    await patient.send_json({"v": 1, "type": "ping"})
    assert (await receive(therapist, "peer-reconnecting"))["role"] == "patient"


async def test_a_patient_back_after_the_grace_period_is_offered_again(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    await patient.close()
    await receive(therapist, "peer-reconnecting")
    harness.clock.advance(31)
    await harness.app[ROOMS].fire_due_timers()
    await receive(therapist, "peer-left")
    back = await sockets.patient(setup.invite_token)
    welcome = await receive(back, "welcome")
    assert (welcome["state"], welcome["peer_present"]) == ("active", True)
    assert (await receive(therapist, "peer-rejoined"))["role"] == "patient"


async def test_a_therapist_who_reconnects_finds_the_patient_and_offers_again(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    await therapist.close()
    assert (await receive(patient, "peer-reconnecting"))["role"] == "therapist"
    again = await sockets.therapist(setup.consult_id)
    welcome = await receive(again, "welcome")
    assert (welcome["state"], welcome["peer_present"]) == ("active", True)
    assert (await receive(patient, "peer-rejoined"))["role"] == "therapist"
    await again.send_json(OFFER)
    await receive(patient, "offer")


async def test_a_second_therapist_tab_replaces_the_first(
    harness: Harness, sockets: Sockets
) -> None:
    setup, first_tab, patient = await admitted_pair(harness, sockets)
    second_tab = await sockets.therapist(setup.consult_id)
    await receive(second_tab, "welcome")
    await receive(first_tab, "replaced")
    assert await closed_with(first_tab) == 4001
    await receive(patient, "peer-rejoined")


async def test_a_denied_patient_may_come_back_to_the_waiting_room(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await waiting_pair(harness, sockets)
    await therapist.send_json({"v": 1, "type": "deny"})
    await receive(patient, "denied")
    again = await sockets.patient(setup.invite_token)
    assert (await receive(again, "welcome"))["state"] == "waiting"
    await receive(therapist, "patient-waiting")


async def test_an_ended_room_is_forgotten_and_refuses_late_connects(
    harness: Harness, sockets: Sockets
) -> None:
    from signaling.protocol import ParticipantRole
    from signaling.rooms import Participant, RoomClosed

    setup, therapist, _patient = await admitted_pair(harness, sockets)
    await therapist.send_json({"v": 1, "type": "end"})
    await receive(therapist, "consult-ended")
    rooms = harness.app[ROOMS]
    late = Participant(uuid.UUID(setup.consult_id), ParticipantRole.PATIENT, "late")

    async def ignore(_delivery: Any) -> None:
        return None

    with pytest.raises(RoomClosed):
        await rooms.connect(late, ice_servers=[], deliver=ignore)
    await rooms.disconnect(late)  # a late disconnect changes nothing
    # Kept two minutes, not an hour: the record says the consult is over, and
    # the rooms of a busy day's ended consults held the server's memory (the soak).
    harness.clock.advance(121)
    await rooms.fire_due_timers()
    assert await rooms._store.peek(uuid.UUID(setup.consult_id)) is None
    # Later still, the record refuses the connect, and no room is left behind.
    with pytest.raises(RoomClosed):
        await rooms.connect(late, ice_servers=[], deliver=ignore)
    harness.clock.advance(121)
    await rooms.fire_due_timers()
    assert await rooms._store.peek(uuid.UUID(setup.consult_id)) is None


async def test_one_failing_timer_does_not_lose_the_others(
    harness: Harness, sockets: Sockets
) -> None:
    _setup, therapist, patient = await admitted_pair(harness, sockets)
    rooms = harness.app[ROOMS]
    ghost = uuid.uuid4()  # no such consult: ending it fails
    await rooms._timers.schedule(f"max:{ghost}", harness.clock.now(), {"consult": str(ghost)})
    await patient.close()
    await receive(therapist, "peer-reconnecting")
    harness.clock.advance(31)
    assert await rooms.fire_due_timers() == 2
    await receive(therapist, "peer-left")  # the grace timer still did its work
    harness.clock.advance(5)
    assert await rooms.fire_due_timers() == 1  # the failing one is tried again


async def test_a_timer_of_an_unknown_kind_is_logged_as_an_error_and_kept(
    harness: Harness, sockets: Sockets
) -> None:
    from structlog.testing import capture_logs

    # A request first: by its answer, the app's own first look for due
    # timers (at start) is over and cannot claim this one.
    await new_consult(harness)
    rooms = harness.app[ROOMS]
    consult_id = uuid.uuid4()
    # As a newer node might leave behind during a rolling upgrade.
    await rooms._timers.schedule(
        f"reminder:{consult_id}", harness.clock.now(), {"consult": str(consult_id)}
    )
    with capture_logs() as logs:
        assert await rooms.fire_due_timers() == 1
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert [entry.get("kind") for entry in errors] == ["reminder"]
    assert not any(str(consult_id) in str(entry) for entry in logs)
    harness.clock.advance(5)
    assert await rooms.fire_due_timers() == 1  # not dropped: still there, tried again


async def test_admission_on_a_record_closed_meanwhile_ends_the_room(
    harness: Harness, sockets: Sockets
) -> None:
    from audit.consults import mark_ended

    setup, therapist, patient = await waiting_pair(harness, sockets)
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_ended(conn, uuid.UUID(setup.consult_id), now=harness.clock.now())
    await therapist.send_json({"v": 1, "type": "admit"})
    # The end comes first; after it the socket closes and nothing else is sent
    # (the refusal of the admit would say the same again).
    assert (await receive(therapist, "consult-ended"))["reason"] == "consult_over"
    closing = await therapist.receive(timeout=5)
    assert (closing.type, closing.data) == (WSMsgType.CLOSE, 4004)
    assert (await receive(patient, "consult-ended"))["reason"] == "consult_over"
    row = await consult_row(harness, setup.consult_id)
    assert (row.status, row.started_at) == ("not_started", None)


async def test_binary_garbage_counts_towards_the_limits_too(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    setup = await new_consult(sqlite_harness)
    therapist = await sqlite_sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    for _ in range(80):
        await therapist.send_bytes(b"\x00\x01garbage")
    while True:
        message = await therapist.receive(timeout=5)
        if message.type is WSMsgType.CLOSE:
            break
        assert json.loads(message.data)["type"] == "error"
    assert message.data == 1008


async def test_patient_a_cannot_relay_into_consult_b(harness: Harness, sockets: Sockets) -> None:
    a, _a_therapist, a_patient = await admitted_pair(harness, sockets)
    harness.client.session.cookie_jar.clear()
    b = await new_consult(harness, email="b@praktijk-noord.example")
    b_therapist = await sockets.therapist(b.consult_id)
    await receive(b_therapist, "welcome")
    await a_patient.send_json({**OFFER, "type": "answer", "consult": b.consult_id})
    assert (await receive(a_patient, "error"))["code"] == "not_in_consult"
    await b_therapist.send_json({"v": 1, "type": "ping"})
    await receive(b_therapist, "pong")  # and nothing else arrived before it
    assert a.consult_id != b.consult_id


async def test_reissued_invite_keeps_a_scheduled_consults_late_expiry(harness: Harness) -> None:
    from datetime import timedelta

    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(therapist)
    later = harness.clock.now() + timedelta(days=3)
    created = await (
        await harness.post("/api/consults", {"scheduled_at": later.isoformat()})
    ).json()
    reissued = await harness.post(f"/api/consults/{created['consult']['id']}/invite")
    body = await reissued.json()
    assert body["invite_expires_at"] == created["invite_expires_at"]


async def test_tickets_per_invite_are_capped(harness: Harness, sockets: Sockets) -> None:
    setup = await new_consult(harness)
    session = await sockets.session()
    tickets = [await sockets.ticket(setup.invite_token, session) for _ in range(7)]
    for old in tickets[:2]:
        refused = await session.get(f"/ws?ticket={old}", headers=harness.headers)
        assert refused.status == 401
    socket_ = await session.ws_connect(f"/ws?ticket={tickets[-1]}", headers=harness.headers)
    await receive(socket_, "welcome")
    await socket_.close()


async def test_a_patient_who_stops_reading_is_closed_and_the_therapist_goes_on(
    make_settings: Any, clock: Any, aiohttp_client: Any
) -> None:
    import base64
    import os

    from server import create_app

    app = create_app(make_settings(signaling_rate_per_s=10000, signaling_burst=10000), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    sockets = Sockets(harness)
    writer = None
    try:
        setup = await new_consult(harness)
        therapist = await sockets.therapist(setup.consult_id)
        await receive(therapist, "welcome")
        # The patient: a raw connection that completes the handshake and then
        # never reads another byte.
        ticket = await sockets.ticket(setup.invite_token)
        url = harness.client.make_url("/")
        reader, writer = await asyncio.open_connection(url.host, url.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws?ticket={ticket} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
                f"Origin: {harness.origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        await receive(therapist, "patient-waiting")
        await therapist.send_json({"v": 1, "type": "admit"})
        await receive(therapist, "peer-joined")

        big_offer = {"v": 1, "type": "offer", "sdp": "a=x-pad:" + "x" * 30_000}
        gone = False
        for _ in range(2000):  # at most 60 MB, never reached: the patient is closed long before
            await therapist.send_json(big_offer)
            try:
                message = await therapist.receive_json(timeout=0.001)
            except TimeoutError:
                continue
            if message["type"] == "peer-reconnecting":
                gone = True
                break
        assert gone, "the server kept writing to a client that does not read"
        await therapist.send_json({"v": 1, "type": "ping"})
        for _ in range(5):
            if (await therapist.receive_json(timeout=5))["type"] == "pong":
                break
        else:
            raise AssertionError("the therapist's socket stopped answering")
    finally:
        if writer is not None:
            writer.close()
        await sockets.close()


async def test_the_server_declines_per_message_compression(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    # Browsers always offer permessage-deflate; the server must not take it
    # (docs/protocol.md, "Limits"), and messages still arrive whole.
    setup = await new_consult(sqlite_harness)
    socket = await sqlite_harness.client.ws_connect(
        f"/ws?consult={setup.consult_id}", headers=sqlite_harness.headers, compress=15
    )
    try:
        assert socket.compress == 0
        assert (await receive(socket, "welcome"))["role"] == "therapist"
    finally:
        await socket.close()


async def test_a_burst_of_candidates_arrives_whole_and_in_order(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    # Frames relayed in one turn of the server's loop leave in one write;
    # each must still be its own, complete frame, in the order sent, with
    # the pings' replies in between.
    _setup, therapist, patient = await admitted_pair(sqlite_harness, sqlite_sockets)
    sent = [f"candidate:{n} 1 udp 2122260223 192.0.2.{n} 5{n:04d} typ host" for n in range(40)]
    for n, candidate in enumerate(sent):
        await patient.send_json(
            {"v": 1, "type": "candidate", "candidate": candidate, "sdpMLineIndex": 0}
        )
        if n % 10 == 0:
            await therapist.send_json({"v": 1, "type": "ping"})
    got: list[str] = []
    pongs = 0
    while len(got) < len(sent) or pongs < 4:
        message = await therapist.receive_json(timeout=5)
        if message["type"] == "pong":
            pongs += 1
            continue
        assert message["type"] == "candidate"
        assert message["sender"] == "patient"
        got.append(message["candidate"])
    assert got == sent


@pytest.mark.settings(signaling_rate_per_s=1000, signaling_burst=1000)
async def test_refusals_of_what_the_room_does_not_allow_now_never_close_the_socket(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness)
    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    # Far more than max_refused (50): nobody waits to be admitted, no peer to
    # relay to; a client that retries is told so each time, and stays.
    for n in range(120):
        message = {"v": 1, "type": "admit"} if n % 2 else {"v": 1, "type": "offer", "sdp": "v=0"}
        await therapist.send_json(message)
        error = await receive(therapist, "error")
        assert error["code"] in ("no_patient_waiting", "not_admitted")
    await therapist.send_json({"v": 1, "type": "ping"})
    await receive(therapist, "pong")


async def test_a_new_link_sends_away_a_patient_waiting_with_the_old_one(
    harness: Harness, sockets: Sockets
) -> None:
    """A therapist makes a new link when the first went to the wrong person:
    whoever waits with the old one is sent away, as by a revoke, and the
    next ``admit`` lets nobody in (found by a review: the old link's holder
    was admitted)."""
    waiting, therapist, patient = await waiting_pair(harness, sockets)
    reissued = await harness.client.post(
        f"/api/consults/{waiting.consult_id}/invite", headers=harness.headers
    )
    assert reissued.status == 200, await reissued.text()
    await receive(patient, "denied")
    closing = await patient.receive(timeout=5)
    assert (closing.type, closing.data) == (WSMsgType.CLOSE, 4003)
    assert (await receive(therapist, "peer-left"))["role"] == "patient"
    await therapist.send_json({"v": 1, "type": "admit"})
    assert (await receive(therapist, "error"))["code"] == "no_patient_waiting"


async def test_revoking_the_link_sends_a_waiting_patient_away_and_keeps_an_admitted_one(
    harness: Harness, sockets: Sockets
) -> None:
    waiting, therapist, patient = await waiting_pair(harness, sockets)
    revoked = await harness.client.delete(
        f"/api/consults/{waiting.consult_id}/invite", headers=harness.headers
    )
    assert revoked.status == 204
    await receive(patient, "denied")
    closing = await patient.receive(timeout=5)
    assert (closing.type, closing.data) == (WSMsgType.CLOSE, 4003)
    assert (await receive(therapist, "peer-left"))["role"] == "patient"

    harness.client.session.cookie_jar.clear()
    admitted, therapist_b, patient_b = await admitted_pair(
        harness, sockets, email="b@praktijk-noord.example"
    )
    revoked = await harness.client.delete(
        f"/api/consults/{admitted.consult_id}/invite", headers=harness.headers
    )
    assert revoked.status == 204
    await patient_b.send_json({"v": 1, "type": "ping"})
    await receive(patient_b, "pong")  # still in the running consult
    await therapist_b.send_json({"v": 1, "type": "offer", "sdp": "v=0"})
    await receive(patient_b, "offer")
