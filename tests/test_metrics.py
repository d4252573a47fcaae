"""/metrics: what one node counts, who may read it, and that it names nobody."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from audit.clock import ManualClock
from audit.technical_log import DropReason
from config import SettingsError, load_settings
from server import create_app
from server.app_keys import TECHNICAL_LOG
from server.metrics import REDIS_TIMEOUT_S, count_rooms
from signaling.protocol import ParticipantRole
from signaling.state import Link, Participant, Presence, RoomPhase, RoomState
from tests.support.harness import Harness, Sockets, new_consult, receive
from tests.support.settings import SettingsFactory

TOKEN = "metrics-token-for-the-tests-0123456789"
OFFER = {"v": 1, "type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\n"}
ANSWER = {"v": 1, "type": "answer", "sdp": "v=0\r\no=- 3 4 IN IP4 0.0.0.0\r\ns=-\r\n"}
CANDIDATE = {
    "v": 1,
    "type": "candidate",
    "candidate": "candidate:1 1 udp 2122260223 192.0.2.1 54400 typ host",
    "sdpMid": "0",
    "sdpMLineIndex": 0,
}


@dataclass
class Scrape:
    text: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def has(self, name: str) -> bool:
        return any(sample_name == name for sample_name, _labels in self.samples)


async def scrape(client: Any, **headers: str) -> Scrape:
    """GET /metrics, which must answer 200 in the exposition format, parsed."""
    response = await client.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    text = await response.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return Scrape(text, samples)


async def settled(*sockets: ClientWebSocketResponse) -> None:
    """Wait until each socket's earlier messages are handled: a socket's
    messages are handled in order, so its pong comes after all of them."""
    for socket in sockets:
        await socket.send_json({"v": 1, "type": "ping"})
        await receive(socket, "pong")


async def app_client(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any, **overrides: Any
) -> Any:
    return await aiohttp_client(create_app(make_settings(**overrides), clock=clock))


@pytest.mark.signaling_backends
async def test_a_consult_is_counted_from_the_waiting_room_through_the_relay(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness, display_name="Mevr. J. de Vries")
    therapist = await sockets.therapist(setup.consult_id)
    therapist_welcome = await receive(therapist, "welcome")
    patient = await sockets.patient(setup.invite_token)
    patient_welcome = await receive(patient, "welcome")
    await receive(therapist, "patient-waiting")

    waiting = await scrape(harness.client)
    assert waiting.value("videoconsult_signaling_participants", role="therapist") == 1
    assert waiting.value("videoconsult_signaling_participants", role="patient") == 1
    assert waiting.value("videoconsult_patients_waiting") == 1
    assert waiting.value("videoconsult_consults_active") == 0

    await patient.send_json(OFFER)
    assert (await receive(patient, "error"))["code"] == "not_admitted"
    await therapist.send_json({"v": 1, "type": "admit"})
    await receive(patient, "admitted")
    await receive(therapist, "peer-joined")

    await therapist.send_json(OFFER)
    await receive(patient, "offer")
    await patient.send_json(ANSWER)
    await receive(therapist, "answer")
    for _ in range(3):
        await patient.send_json(CANDIDATE)
        await receive(therapist, "candidate")
    for _ in range(2):
        await therapist.send_json(CANDIDATE)
        await receive(patient, "candidate")
    await patient.send_json({"v": 1, "type": "answer"})
    assert (await receive(patient, "error"))["code"] == "invalid_message"
    await settled(therapist, patient)

    active = await scrape(harness.client)
    assert active.value("videoconsult_signaling_participants", role="therapist") == 1
    assert active.value("videoconsult_signaling_participants", role="patient") == 1
    assert active.value("videoconsult_consults_active") == 1
    assert active.value("videoconsult_patients_waiting") == 0
    relayed = "videoconsult_signaling_messages_relayed_total"
    assert active.value(relayed, type="offer") == 1
    assert active.value(relayed, type="answer") == 1
    assert active.value(relayed, type="candidate") == 5
    assert active.value("videoconsult_signaling_relay_seconds_count") == 7
    assert 0 < active.value("videoconsult_signaling_relay_seconds_sum") < 7
    errors = "videoconsult_signaling_errors_total"
    assert active.value(errors, code="invalid_message") == 1
    assert active.value(errors, code="not_admitted") == 1
    assert active.value(errors, code="rate_limited") == 0
    opened = "videoconsult_signaling_connections_total"
    assert active.value(opened, role="therapist") == 1
    assert active.value(opened, role="patient") == 1

    personal = [
        setup.consult_id,
        setup.consult_id.replace("-", ""),
        setup.invite_token,
        setup.therapist.email,
        "de Vries",
        therapist_welcome["connection"],
        patient_welcome["connection"],
        "127.0.0.1",
        "192.0.2.1",
    ]
    for text in personal:
        assert text not in active.text, f"{text!r} is in the metrics"


async def test_a_consult_leaves_the_gauges_when_its_sockets_close(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    setup = await new_consult(sqlite_harness)
    therapist = await sqlite_sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    patient = await sqlite_sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    await receive(therapist, "patient-waiting")
    await patient.close()
    await receive(therapist, "peer-left")

    after = await scrape(sqlite_harness.client)
    assert after.value("videoconsult_signaling_participants", role="patient") == 0
    assert after.value("videoconsult_signaling_participants", role="therapist") == 1
    assert after.value("videoconsult_patients_waiting") == 0


async def tasks_now(client: Any) -> float:
    return (await scrape(client)).value("videoconsult_asyncio_tasks")


async def test_the_asyncio_tasks_are_counted_and_an_ended_consult_leaves_none_behind(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    client = sqlite_harness.client
    setup = await new_consult(sqlite_harness)
    # The scrape's own task at least; the test's own tasks too (one process).
    before = await tasks_now(client)
    assert before >= 1

    therapist = await sqlite_sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    patient = await sqlite_sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    await receive(therapist, "patient-waiting")
    await therapist.send_json({"v": 1, "type": "admit"})
    await receive(patient, "admitted")
    await receive(therapist, "peer-joined")
    await therapist.send_json(OFFER)
    await receive(patient, "offer")
    # Open sockets keep no task (server/ws/connection.py): a task runs only
    # while a received frame is being handled.
    assert await tasks_now(client) == before

    await therapist.send_json({"v": 1, "type": "end"})
    await receive(therapist, "consult-ended")
    await receive(patient, "consult-ended")
    # The patient's browser session goes too (its kept-alive ticket request).
    await sqlite_sockets.close()
    for _ in range(100):  # up to 5 s: each socket's end runs once it is closed
        if (now := await tasks_now(client)) == before:
            break
        await asyncio.sleep(0.05)
    assert now == before


async def test_refused_sockets_are_counted_by_reason(sqlite_harness: Harness) -> None:
    client = sqlite_harness.client
    bad_ticket = await client.get("/ws?ticket=not-a-ticket", headers=sqlite_harness.headers)
    assert bad_ticket.status == 401
    no_origin = await client.get("/ws?ticket=not-a-ticket")
    assert no_origin.status == 403
    not_logged_in = await client.get(f"/ws?consult={uuid.uuid4()}", headers=sqlite_harness.headers)
    assert not_logged_in.status == 401

    refused = await scrape(client)
    name = "videoconsult_signaling_connections_refused_total"
    assert refused.value(name, reason="ticket_invalid") == 1
    assert refused.value(name, reason="origin_refused") == 1
    assert refused.value(name, reason="not_logged_in") == 1
    assert refused.value(name, reason="invite_expired") == 0


async def test_metrics_are_refused_outside_the_allowed_networks(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any
) -> None:
    # The test client connects from 127.0.0.1.
    client = await app_client(
        make_settings, clock, aiohttp_client, metrics_allowed_networks="10.0.0.0/8"
    )
    response = await client.get("/metrics")
    assert response.status == 403
    assert await response.json() == {"error": {"code": "forbidden", "message": "not allowed"}}


async def test_the_token_lets_a_client_in_from_anywhere_and_only_the_right_one(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any
) -> None:
    client = await app_client(
        make_settings,
        clock,
        aiohttp_client,
        metrics_allowed_networks="10.0.0.0/8",
        metrics_token=TOKEN,
    )
    await scrape(client, Authorization=f"Bearer {TOKEN}")
    await scrape(client, Authorization=f"bearer {TOKEN}")
    for wrong in [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Basic {TOKEN}", TOKEN]:
        response = await client.get("/metrics", headers={"Authorization": wrong})
        assert response.status == 403, wrong
    assert (await client.get("/metrics")).status == 403


async def test_a_forwarded_request_gets_in_by_the_token_only(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any
) -> None:
    # A reverse proxy on this machine is inside the default networks (loopback)
    # but may be passing on anybody's request.
    client = await app_client(make_settings, clock, aiohttp_client, metrics_token=TOKEN)
    await scrape(client)
    for header in ["X-Forwarded-For", "Forwarded", "X-Real-IP"]:
        response = await client.get("/metrics", headers={header: "203.0.113.7"})
        assert response.status == 403, header
    await scrape(client, **{"X-Forwarded-For": "203.0.113.7", "Authorization": f"Bearer {TOKEN}"})


async def test_metrics_turned_off_are_not_there(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any
) -> None:
    client = await app_client(make_settings, clock, aiohttp_client, metrics_enabled="false")
    response = await client.get("/metrics")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


async def test_without_redis_no_redis_metrics_are_reported(sqlite_harness: Harness) -> None:
    metrics = await scrape(sqlite_harness.client)
    assert not metrics.has("videoconsult_redis_up")
    assert not metrics.has("videoconsult_redis_roundtrip_seconds")
    assert metrics.has("process_resident_memory_bytes")


async def test_with_redis_its_round_trip_is_reported(
    make_settings: SettingsFactory,
    clock: ManualClock,
    aiohttp_client: Any,
    redis_url: str,
    redis_prefix: str,
) -> None:
    client = await app_client(
        make_settings, clock, aiohttp_client, redis_url=redis_url, redis_key_prefix=redis_prefix
    )
    metrics = await scrape(client)
    assert metrics.value("videoconsult_redis_up") == 1
    assert 0 < metrics.value("videoconsult_redis_roundtrip_seconds") < REDIS_TIMEOUT_S
    # Nothing of where Redis is (a bare "6379" can be digits of a measured value:
    # a round trip of 0.0343026379 s failed this test once).
    assert redis_url not in metrics.text
    assert "redis://" not in metrics.text
    assert ":6379" not in metrics.text


async def test_an_unreachable_redis_is_reported_down_and_the_scrape_still_answers(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any, free_port: int
) -> None:
    client = await app_client(
        make_settings,
        clock,
        aiohttp_client,
        redis_url=f"redis://127.0.0.1:{free_port}/0",
        redis_connect_timeout_s=1,
    )
    started = time.monotonic()
    metrics = await scrape(client)
    assert time.monotonic() - started < REDIS_TIMEOUT_S + 1
    assert metrics.value("videoconsult_redis_up") == 0
    assert not metrics.has("videoconsult_redis_roundtrip_seconds")
    assert metrics.value("videoconsult_signaling_participants", role="patient") == 0


def _room(phase: RoomPhase, therapist: Presence | None, patient: Presence | None) -> RoomState:
    return RoomState(phase=phase, therapist=therapist, patient=patient)


def test_a_consult_on_two_nodes_counts_on_its_therapists_node_only() -> None:
    consult = uuid.uuid4()
    state = {consult: _room(RoomPhase.ACTIVE, Presence("t1", node="a"), Presence("p1", node="b"))}
    therapist_node = [Participant(consult, ParticipantRole.THERAPIST, "t1")]
    patient_node = [Participant(consult, ParticipantRole.PATIENT, "p1")]
    assert count_rooms(state, therapist_node).active_consults == 1
    assert count_rooms(state, patient_node).active_consults == 0


def test_while_the_therapist_reconnects_the_consult_counts_on_the_patients_node() -> None:
    consult = uuid.uuid4()
    away = Presence("t1", link=Link.RECONNECTING, node="a")
    state = {consult: _room(RoomPhase.ACTIVE, away, Presence("p1", node="b"))}
    patient_node = [Participant(consult, ParticipantRole.PATIENT, "p1")]
    assert count_rooms(state, patient_node).active_consults == 1


def test_a_replaced_connection_counts_for_nothing() -> None:
    consult = uuid.uuid4()
    # The patient came back on another device (connection p2, on node b).
    waiting = {consult: _room(RoomPhase.WAITING, None, Presence("p2", node="b"))}
    old_device = [Participant(consult, ParticipantRole.PATIENT, "p1")]
    new_device = [Participant(consult, ParticipantRole.PATIENT, "p2")]
    assert count_rooms(waiting, old_device).waiting_patients == 0
    assert count_rooms(waiting, new_device).waiting_patients == 1


def test_a_short_or_padded_metrics_token_is_refused_without_showing_it() -> None:
    for token in ["too-short", f" {TOKEN}"]:
        with pytest.raises(SettingsError) as refused:
            load_settings({"VIDEOCONSULT_METRICS_TOKEN": token})
        assert "metrics.token" in str(refused.value)
        assert "(hidden)" in str(refused.value)
        assert token.strip() not in str(refused.value)


def test_a_metrics_network_that_is_not_one_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"metrics\.allowed_networks.*'10\.0\.0\.0/33'"):
        load_settings({"VIDEOCONSULT_METRICS_ALLOWED_NETWORKS": "127.0.0.1, 10.0.0.0/33"})


async def test_dropped_technical_log_entries_are_counted_by_reason(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any
) -> None:
    client = await app_client(make_settings, clock, aiohttp_client)
    before = await scrape(client)
    for reason in DropReason:
        assert before.value("videoconsult_technical_log_dropped_total", reason=reason.value) == 0
    client.server.app[TECHNICAL_LOG].dropped[DropReason.REPORT_QUOTA] += 3
    after = await scrape(client)
    assert after.value("videoconsult_technical_log_dropped_total", reason="report_quota") == 3
