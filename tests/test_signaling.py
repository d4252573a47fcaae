"""The signaling socket: waiting room, admission, relay, reconnects, limits, authorization."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import ClientWebSocketResponse, WSMsgType

from audit.accounts import Role
from audit.schema import consults
from server.app_keys import DB_ENGINE, ROOMS
from tests.harness import Harness, Sockets, new_consult, receive

OFFER = {"v": 1, "type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\n"}


async def closed_with(socket: ClientWebSocketResponse) -> int:
    """The close code the server sent (what a browser's CloseEvent reports)."""
    message = await socket.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE, message
    code: int = message.data
    return code


async def consult_row(harness: Harness, consult_id: str) -> sa.Row[tuple[object, ...]]:
    async with harness.app[DB_ENGINE].connect() as conn:
        return (
            await conn.execute(sa.select(consults).where(consults.c.id == uuid.UUID(consult_id)))
        ).one()


async def admitted_pair(harness: Harness, sockets: Sockets, **body: Any):
    setup = await new_consult(harness, **body)
    therapist = await sockets.therapist(setup.consult_id)
    welcome = await receive(therapist, "welcome")
    assert welcome["role"] == "therapist"
    patient = await sockets.patient(setup.invite_token)
    assert (await receive(patient, "welcome"))["state"] == "waiting"
    await receive(therapist, "patient-waiting")
    await therapist.send_json({"v": 1, "type": "admit"})
    await receive(patient, "admitted")
    await receive(therapist, "peer-joined")
    return setup, therapist, patient


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
    setup = await new_consult(harness)
    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    patient = await sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    await receive(therapist, "patient-waiting")
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
    # The invite stops working and says why.
    gone = await harness.client.get(f"/api/invites/{setup.invite_token}")
    assert gone.status == 410
    assert (await gone.json())["error"]["message"] == "This consultation has ended."


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
    await therapist.send_json({"v": 1, "type": "bye"})
    await receive(therapist, "consult-ended")
    row = await consult_row(harness, setup.consult_id)
    assert row.status == "ended"


async def test_both_gone_past_grace_ends_the_consult(harness: Harness, sockets: Sockets) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    harness.clock.advance(60)
    await patient.close()
    await receive(therapist, "peer-reconnecting")
    await therapist.close()
    harness.clock.advance(31)
    await harness.app[ROOMS].fire_due_timers()
    row = await consult_row(harness, setup.consult_id)
    assert row.status == "ended"
    assert row.duration_s == 60 + 31


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
        ('{"v": 1, "type": "offer", "sdp": 5}', "invalid_message"),
        ('{"v": 1, "type": "offer"}', "invalid_message"),
        ('{"v": 1, "type": "ping", "extra": true}', "invalid_message"),
        ('{"v": 1, "type": "candidate", "candidate": "x", "sdpMLineIndex": -1}', "invalid_message"),
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


async def test_another_therapist_cannot_open_or_admit_in_my_consult(
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
    }
    assert {column.name for column in consults.columns} == promised

    def columns(sync: sa.Connection) -> set[str]:
        return {column["name"] for column in sa.inspect(sync).get_columns("consults")}

    async with harness.app[DB_ENGINE].connect() as conn:
        assert await conn.run_sync(columns) == promised
