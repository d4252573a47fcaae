"""Signed webhooks (issue 21, item 4): an admin's endpoints, events written to
the outbox with the change they tell of, and their delivery to a real
receiver (an aiohttp server verifying every signature with the
``standardwebhooks`` library), on SQLite and PostgreSQL.

The harness's own webhook job waits an hour between rounds: each test sends
what is due itself (:func:`server.webhooks.deliver_due`), when it means to,
on a manual clock (the signature's timestamp is the wall clock's: the
receiver refuses one more than five minutes off its own).
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from fhir.resources.R4B.encounter import Encounter
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from audit.access_log import verify_chain
from audit.accounts import Role, find_account_by_email
from audit.clock import ManualClock
from audit.consults import create_consult, mark_ended, mark_started
from audit.outbox import DeliveryStatus, claim_due, record_attempt
from audit.retention import Retention, purge
from audit.schema import access_log, webhook_deliveries, webhook_endpoints, webhook_events
from audit.support import TherapistPseudonyms
from config import Settings
from server import create_app
from server.app_keys import DB_ENGINE, MASTER_KEY
from server.webhooks import deliver_due, purge_webhook_history
from tests.support.databases import QUICK_ON_SQLITE
from tests.support.harness import (
    Harness,
    Professional,
    Sockets,
    admitted_pair,
    receive,
    stored_recording,
)
from tests.support.settings import SettingsFactory
from tests.support.webhooks import Receiver

pytestmark = pytest.mark.settings(
    webhooks_allow_http_loopback="true",
    webhooks_poll_interval_s="3600",
    webhooks_retry_base_s="30",
)

ALL_EVENTS = ["consult.started", "consult.ended", "recording.available", "recording.deleted"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC).replace(microsecond=0))  # for the tokens' checks


@pytest.fixture
async def receiver(free_port: int) -> AsyncIterator[Receiver]:
    found = Receiver(free_port)
    await found.start()
    yield found
    await found.stop()


async def admin_of(harness: Harness) -> Professional:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    return admin


async def register(harness: Harness, url: str, events: list[str] | None = None) -> dict[str, Any]:
    answer = await harness.post("/api/admin/webhooks", {"url": url, "events": events or ALL_EVENTS})
    assert answer.status == 201, await answer.text()
    created: dict[str, Any] = await answer.json()
    return created


async def deliveries(harness: Harness, endpoint_id: str, query: str = "") -> list[dict[str, Any]]:
    answer = await harness.client.get(f"/api/admin/webhooks/{endpoint_id}/deliveries{query}")
    assert answer.status == 200, await answer.text()
    found: list[dict[str, Any]] = (await answer.json())["deliveries"]
    return found


async def actions_of(harness: Harness, actor: uuid.UUID) -> list[tuple[str, str]]:
    async with harness.app[DB_ENGINE].connect() as conn:
        rows = await conn.execute(
            sa.select(access_log.c.action, access_log.c.outcome)
            .where(access_log.c.actor_id == actor, access_log.c.action.startswith("webhook."))
            .order_by(access_log.c.id)
        )
        return [(row.action, row.outcome) for row in rows]


async def test_an_admin_registers_lists_rotates_and_deletes_an_endpoint(
    harness: Harness, receiver: Receiver
) -> None:
    admin = await admin_of(harness)
    created = await register(harness, receiver.url, ["consult.ended", "consult.started"])
    secret = created["secret"]
    endpoint = created["endpoint"]
    # The Standard Webhooks format: whsec_ and the base64 of 32 random bytes.
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert endpoint["url"] == receiver.url
    assert endpoint["events"] == ["consult.started", "consult.ended"]  # in their own order

    listed = await (await harness.client.get("/api/admin/webhooks")).json()
    assert [found["id"] for found in listed["endpoints"]] == [endpoint["id"]]
    assert listed["endpoints"][0]["deliveries"] == {"pending": 0, "delivered": 0, "failed": 0}
    assert secret not in str(listed)  # shown once, never again
    # Kept sealed: not in the database in the clear, nor its raw bytes.
    async with harness.app[DB_ENGINE].connect() as conn:
        sealed = (await conn.execute(sa.select(webhook_endpoints.c.secret_sealed))).scalar_one()
    raw = base64.b64decode(secret.removeprefix("whsec_"))
    assert secret.encode() not in sealed
    assert raw not in sealed

    rotated = await harness.post(f"/api/admin/webhooks/{endpoint['id']}/rotate-secret")
    assert rotated.status == 200, await rotated.text()
    new = await rotated.json()
    assert new["secret"] != secret
    assert new["secret"].startswith("whsec_")
    assert new["endpoint"]["secret_rotated_at"] is not None
    expires = datetime.fromisoformat(new["endpoint"]["previous_secret_expires_at"])
    assert expires == harness.clock.now() + timedelta(days=1)

    gone = await harness.client.delete(
        f"/api/admin/webhooks/{endpoint['id']}", headers=harness.headers
    )
    assert gone.status == 204
    again = await harness.client.delete(
        f"/api/admin/webhooks/{endpoint['id']}", headers=harness.headers
    )
    assert again.status == 404
    assert (await (await harness.client.get("/api/admin/webhooks")).json())["endpoints"] == []
    assert await actions_of(harness, admin.account_id) == [
        ("webhook.create", "allowed"),
        ("webhook.list", "allowed"),
        ("webhook.rotate-secret", "allowed"),
        ("webhook.delete", "allowed"),
        ("webhook.delete", "refused"),
        ("webhook.list", "allowed"),
    ]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"url": "http://example.org/hooks", "events": ALL_EVENTS}, "http is allowed to 127.0.0.1"),
        ({"url": "ftp://example.org/hooks", "events": ALL_EVENTS}, "https://"),
        ({"url": "https://127.0.0.1/hooks", "events": ALL_EVENTS}, "this machine"),
        ({"url": "https://169.254.169.254/latest", "events": ALL_EVENTS}, "link-local"),
        ({"url": "https://10.1.2.3/hooks", "events": ALL_EVENTS}, "a private network"),
        ({"url": "https://0.0.0.0/hooks", "events": ALL_EVENTS}, "unspecified"),
        ({"url": "https://[::ffff:127.0.0.1]/hooks", "events": ALL_EVENTS}, "this machine"),
        ({"url": "https://localhost/hooks", "events": ALL_EVENTS}, "this machine"),
        # This machine behind a NAT64 or 6to4 prefix (found in review).
        ({"url": "https://[64:ff9b::7f00:1]/hooks", "events": ALL_EVENTS}, "this machine"),
        ({"url": "https://[2002:7f00:1::]/hooks", "events": ALL_EVENTS}, "this machine"),
        # Host names no resolver takes (found in review: aiohttp raised at the send).
        ({"url": "https://a..b/hooks", "events": ALL_EVENTS}, "host name"),
        ({"url": f"https://{'x' * 64}.example.org/", "events": ALL_EVENTS}, "host name"),
        ({"url": "https://user:pw@example.org/", "events": ALL_EVENTS}, "user name or password"),
        ({"url": "https://example.org:99999/", "events": ALL_EVENTS}, "cannot be read"),
        ({"url": "https://example.org/#x", "events": ALL_EVENTS}, "fragment"),
        ({"url": "https://example.org/", "events": ["consult.paused"]}, "unknown event"),
        ({"url": "https://example.org/", "events": ["consult.ended"] * 2}, "named twice"),
        ({"url": "https://example.org/", "events": []}, "'events'"),
        ({"url": "https://example.org/"}, "'events' is required"),
        ({"url": "https://example.org/", "events": ALL_EVENTS, "x": 1}, "'x' is not expected"),
    ],
)
@QUICK_ON_SQLITE
async def test_a_bad_endpoint_is_refused_naming_the_problem(
    harness: Harness, body: dict[str, Any], named: str
) -> None:
    await admin_of(harness)
    answer = await harness.post("/api/admin/webhooks", body)
    assert answer.status == 422, await answer.text()
    assert named in (await answer.json())["error"]["message"]


@pytest.mark.settings(webhooks_allow_http_loopback="false")
async def test_http_to_this_machine_needs_the_servers_setting(harness: Harness) -> None:
    await admin_of(harness)
    answer = await harness.post(
        "/api/admin/webhooks", {"url": "http://127.0.0.1:9/hooks", "events": ALL_EVENTS}
    )
    assert answer.status == 422
    assert "must use https" in (await answer.json())["error"]["message"]


async def test_only_the_organisations_admin_reaches_its_endpoints(
    harness: Harness, receiver: Receiver
) -> None:
    await admin_of(harness)
    endpoint = (await register(harness, receiver.url))["endpoint"]
    other = await harness.professional("admin@praktijk-zuid.example", Role.ADMIN, "Praktijk Zuid")
    await harness.logged_in(other)
    assert (await (await harness.client.get("/api/admin/webhooks")).json())["endpoints"] == []
    path = f"/api/admin/webhooks/{endpoint['id']}"
    assert (await harness.client.get(path + "/deliveries")).status == 404
    assert (await harness.post(path + "/rotate-secret")).status == 404
    assert await actions_of(harness, other.account_id) == [
        ("webhook.list", "allowed"),
        ("webhook.deliveries.read", "refused"),
        ("webhook.rotate-secret", "refused"),
    ]
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(therapist)
    assert (await harness.client.get("/api/admin/webhooks")).status == 403
    assert (await harness.post("/api/admin/webhooks", {"url": receiver.url})).status == 403


async def test_each_event_is_delivered_once_signed_with_what_the_record_system_needs(
    harness: Harness, sockets: Sockets, receiver: Receiver
) -> None:
    admin = await admin_of(harness)
    created = await register(harness, receiver.url)
    receiver.secret = created["secret"]
    setup, therapist, _patient = await admitted_pair(
        harness, sockets, scheduled_at=harness.clock.now().isoformat()
    )
    harness.clock.advance(25 * 60)
    await therapist.send_json({"v": 1, "type": "end"})
    await receive(therapist, "consult-ended")
    recording_id = await stored_recording(harness, setup.consult_id, b"\x1a\x45\xdf\xa3 media")
    await harness.logged_in(setup.therapist)  # the session idled out meanwhile
    deleted = await harness.client.delete(
        f"/api/recordings/{recording_id}", headers=harness.headers
    )
    assert deleted.status == 204, await deleted.text()

    assert await deliver_due(harness.app) == 4
    assert await deliver_due(harness.app) == 0  # nothing left: each once
    assert receiver.refused == []
    assert receiver.repeats() == {}
    pseudonym = TherapistPseudonyms(harness.app[MASTER_KEY].key).of(setup.therapist.account_id)
    (started,) = receiver.of_type("consult.started")
    (ended,) = receiver.of_type("consult.ended")
    assert started["data"]["consult_id"] == ended["data"]["consult_id"] == setup.consult_id
    assert started["data"]["therapist"] == ended["data"]["therapist"] == pseudonym
    assert started["data"]["status"] == "active"
    assert started["data"]["ended_at"] is None
    data = ended["data"]
    assert data["status"] == "ended"
    assert data["end_reason"] == "ended_by_therapist"
    assert data["duration_s"] == 25 * 60
    assert data["scheduled_at"] is not None
    moments = [datetime.fromisoformat(data[key]) for key in ("started_at", "ended_at")]
    assert (moments[1] - moments[0]).total_seconds() == data["duration_s"]
    # Nothing that names anyone: ids, times, statuses and a pseudonym.
    assert set(data) == {
        "consult_id",
        "therapist",
        "therapist_id_kind",
        "scheduled_at",
        "started_at",
        "ended_at",
        "duration_s",
        "status",
        "end_reason",
    }
    (available,) = receiver.of_type("recording.available")
    assert available["data"]["recording_id"] == str(recording_id)
    assert available["data"]["status"] == "complete"
    (gone,) = receiver.of_type("recording.deleted")
    assert gone["data"]["recording_id"] == str(recording_id)
    for entry in receiver.received:
        assert entry.webhook_id.startswith("msg_")
        assert entry.headers["webhook-signature"].startswith("v1,")

    await harness.logged_in(admin)
    seen = await deliveries(harness, created["endpoint"]["id"])
    assert sorted(entry["webhook_id"] for entry in seen) == sorted(receiver.unique())
    assert {entry["status"] for entry in seen} == {"delivered"}
    assert {entry["last_status_code"] for entry in seen} == {204}
    # Delivered: the event keeps no data any more, only that it was sent.
    async with harness.app[DB_ENGINE].connect() as conn:
        kept = (
            await conn.execute(sa.select(webhook_events.c.data, webhook_events.c.therapist_id))
        ).all()
    assert [tuple(row) for row in kept] == [({}, None)] * 4


async def disclosures(harness: Harness) -> list[dict[str, Any]]:
    """The access records of delivered webhooks, oldest first."""
    async with harness.app[DB_ENGINE].connect() as conn:
        rows = await conn.execute(
            sa.select(access_log)
            .where(access_log.c.action == "webhook.delivered")
            .order_by(access_log.c.id)
        )
        return [dict(row._mapping) for row in rows]


async def test_each_delivered_message_is_access_logged_once_as_a_disclosure_to_its_endpoint(
    harness: Harness, receiver: Receiver
) -> None:
    # A message tells the record system the consult's times and the
    # therapist's pseudonym: a disclosure of personal data, in the log.
    admin = await admin_of(harness)
    created = await register(harness, receiver.url)
    receiver.secret = created["secret"]
    endpoint_id = uuid.UUID(created["endpoint"]["id"])
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(
            conn, therapist_id=therapist.account_id, now=harness.clock.now()
        )
        await mark_started(conn, consult.id, now=harness.clock.now())
        await mark_ended(conn, consult.id, now=harness.clock.now(), end_reason="both_left")
    recording_id = await stored_recording(harness, str(consult.id), b"\x1a\x45\xdf\xa3 media")
    assert await disclosures(harness) == []  # written as it is delivered, not before
    assert await deliver_due(harness.app) == 3
    assert await deliver_due(harness.app) == 0
    found = await disclosures(harness)
    assert sorted((r["object_type"], r["object_id"]) for r in found) == sorted(
        [
            ("consult", str(consult.id)),
            ("consult", str(consult.id)),
            ("recording", str(recording_id)),
        ]
    )
    for record in found:
        # The system sent it; the record names the endpoint by its id only.
        assert record["actor_role"] == "system"
        assert record["actor_id"] == endpoint_id
        assert record["client_type"] == "webhook"
        assert record["outcome"] == "allowed"
        assert record["organisation_id"] == admin.organisation.id
        assert record["at"] == harness.clock.now()
        assert receiver.url not in str(record)
        assert created["secret"] not in str(record)
    # One record per message the endpoint took, on the organisation's intact chain.
    assert len(found) == len(receiver.unique()) == 3
    # Walked as `videoconsult audit verify` walks it (worker processes).
    assert (await verify_chain(harness.app[DB_ENGINE])).intact


async def test_an_attempt_without_a_2xx_answer_is_not_access_logged(
    harness: Harness, receiver: Receiver
) -> None:
    await admin_of(harness)
    created = await register(harness, receiver.url, ["consult.started"])
    receiver.secret = "whsec_" + base64.b64encode(b"\x01" * 32).decode()  # answered 401
    await started_consult(harness)
    assert await deliver_due(harness.app) == 1
    await receiver.stop()
    harness.clock.advance(30)
    assert await deliver_due(harness.app) == 1  # nobody listens
    assert await disclosures(harness) == []
    receiver.secret = created["secret"]
    await receiver.start()
    harness.clock.advance(60)
    assert await deliver_due(harness.app) == 1
    (record,) = await disclosures(harness)
    assert record["actor_id"] == uuid.UUID(created["endpoint"]["id"])
    assert record["object_type"] == "consult"


async def test_an_endpoint_hears_only_the_events_it_took(
    harness: Harness, receiver: Receiver
) -> None:
    await admin_of(harness)
    receiver.secret = (await register(harness, receiver.url, ["consult.ended"]))["secret"]
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(
            conn, therapist_id=therapist.account_id, now=harness.clock.now()
        )
        await mark_started(conn, consult.id, now=harness.clock.now())
        await mark_ended(conn, consult.id, now=harness.clock.now(), end_reason="both_left")
    assert await deliver_due(harness.app) == 1
    (ended,) = receiver.of_type("consult.ended")
    assert ended["data"]["end_reason"] == "both_left"
    assert receiver.of_type("consult.started") == []


async def test_an_event_is_written_only_with_the_change_it_tells_of(
    harness: Harness, receiver: Receiver
) -> None:
    await admin_of(harness)
    await register(harness, receiver.url)
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(
            conn, therapist_id=therapist.account_id, now=harness.clock.now()
        )
    async with harness.app[DB_ENGINE].connect() as conn:
        await conn.begin()
        await mark_started(conn, consult.id, now=harness.clock.now())
        await conn.rollback()  # the transaction fails after the change
    async with harness.app[DB_ENGINE].connect() as conn:
        assert (await conn.scalar(sa.select(sa.func.count()).select_from(webhook_events))) == 0
    # A second start changes nothing and tells nothing.
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_started(conn, consult.id, now=harness.clock.now())
        await mark_started(conn, consult.id, now=harness.clock.now())
    async with harness.app[DB_ENGINE].connect() as conn:
        assert (await conn.scalar(sa.select(sa.func.count()).select_from(webhook_events))) == 1


async def started_consult(harness: Harness) -> None:
    """A consult started (``consult.started``), by the organisation's therapist."""
    async with harness.app[DB_ENGINE].connect() as conn:
        found = await find_account_by_email(conn, "t@praktijk-noord.example")
    therapist_id = (
        found.id
        if found is not None
        else (await harness.professional("t@praktijk-noord.example", Role.THERAPIST)).account_id
    )
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(conn, therapist_id=therapist_id, now=harness.clock.now())
        await mark_started(conn, consult.id, now=harness.clock.now())


async def test_a_receiver_down_for_a_while_gets_the_event_after_the_backoff(
    harness: Harness, receiver: Receiver
) -> None:
    await admin_of(harness)
    created = await register(harness, receiver.url, ["consult.started"])
    receiver.secret = created["secret"]
    await started_consult(harness)
    await receiver.stop()

    assert await deliver_due(harness.app) == 1  # refused: nobody listens
    (first,) = await deliveries(harness, created["endpoint"]["id"])
    assert first["status"] == "pending"
    assert first["attempts"] == 1
    assert first["last_error"] == "could not connect"
    assert first["last_status_code"] is None
    retry_at = datetime.fromisoformat(first["next_attempt_at"])
    assert retry_at == harness.clock.now() + timedelta(seconds=30)  # webhooks.retry_base_s
    harness.clock.advance(29)
    assert await deliver_due(harness.app) == 0  # not before the backoff
    harness.clock.advance(1)
    assert await deliver_due(harness.app) == 1  # still down: the wait doubles
    (second,) = await deliveries(harness, created["endpoint"]["id"], "?status=pending")
    assert second["attempts"] == 2
    assert datetime.fromisoformat(second["next_attempt_at"]) == harness.clock.now() + timedelta(
        seconds=60
    )

    await receiver.start()
    harness.clock.advance(60)
    assert await deliver_due(harness.app) == 1
    metrics = (await (await harness.client.get("/metrics")).text()).splitlines()
    assert 'videoconsult_webhook_attempts_total{status="pending"} 2.0' in metrics
    assert 'videoconsult_webhook_attempts_total{status="delivered"} 1.0' in metrics
    (done,) = await deliveries(harness, created["endpoint"]["id"])
    assert done["status"] == "delivered"
    assert done["attempts"] == 3
    assert list(receiver.unique()) == [first["webhook_id"]]  # the same id on every attempt
    assert receiver.repeats() == {}


@pytest.mark.settings(
    webhooks_allow_http_loopback="true",
    webhooks_poll_interval_s="3600",
    webhooks_retry_base_s="600",
    webhooks_retry_for_s="3600",
)
async def test_a_delivery_that_never_succeeds_is_failed_when_the_retries_run_out(
    harness: Harness, receiver: Receiver
) -> None:
    admin = await admin_of(harness)
    created = await register(harness, receiver.url, ["consult.started"])
    # A wrong secret at the receiver: every attempt is answered 401.
    receiver.secret = "whsec_" + base64.b64encode(b"\x01" * 32).decode()
    await started_consult(harness)
    attempts = 0
    while await deliver_due(harness.app):
        attempts += 1
        harness.clock.advance(3600)  # past every wait; never past the hour's deadline twice
    await harness.logged_in(admin)  # the session idled out meanwhile
    (failed,) = await deliveries(harness, created["endpoint"]["id"], "?status=failed")
    # At 0 s, then at the deadline (the wait of 600 s is cut to it): 1 hour in all.
    assert attempts == failed["attempts"] == 2
    assert failed["last_status_code"] == 401
    assert failed["last_error"] == "answered HTTP 401"
    assert failed["finished_at"] is not None
    assert failed["next_attempt_at"] is None
    listed = await (await harness.client.get("/api/admin/webhooks")).json()
    assert listed["endpoints"][0]["deliveries"] == {"pending": 0, "delivered": 0, "failed": 1}
    assert len(receiver.refused) == 2
    assert receiver.received == []


async def test_a_wrong_secret_fails_verification_and_the_right_one_passes(
    harness: Harness, receiver: Receiver
) -> None:
    await admin_of(harness)
    created = await register(harness, receiver.url, ["consult.started"])
    receiver.secret = "whsec_" + base64.b64encode(b"\x02" * 32).decode()
    await started_consult(harness)
    await deliver_due(harness.app)
    (refused,) = receiver.refused
    with pytest.raises(WebhookVerificationError):
        Webhook(receiver.secret).verify(refused.body, refused.headers)
    message = Webhook(created["secret"]).verify(refused.body, refused.headers)
    assert message["type"] == "consult.started"
    # Altered on the way: no longer verifies, even with the right secret.
    with pytest.raises(WebhookVerificationError):
        Webhook(created["secret"]).verify(
            refused.body.replace(b"active", b"ended"), refused.headers
        )


async def test_after_a_rotation_both_secrets_sign_for_a_day(
    harness: Harness, receiver: Receiver
) -> None:
    await admin_of(harness)
    created = await register(harness, receiver.url, ["consult.started"])
    rotated = await harness.post(f"/api/admin/webhooks/{created['endpoint']['id']}/rotate-secret")
    new_secret = (await rotated.json())["secret"]
    receiver.secret = created["secret"]  # the record system has not switched yet
    await started_consult(harness)
    await deliver_due(harness.app)
    (entry,) = receiver.received
    assert len(entry.headers["webhook-signature"].split(" ")) == 2
    Webhook(new_secret).verify(entry.body, entry.headers)

    harness.clock.advance(86400)
    receiver.secret = new_secret
    await started_consult(harness)
    await deliver_due(harness.app)
    latest = receiver.received[-1]
    assert len(latest.headers["webhook-signature"].split(" ")) == 1  # the old one is done
    with pytest.raises(WebhookVerificationError):
        Webhook(created["secret"]).verify(latest.body, latest.headers)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_nodes_on_one_database_do_not_both_deliver_an_event(
    harness: Harness,
    harness_settings: Settings,
    clock: ManualClock,
    aiohttp_client: Any,
    receiver: Receiver,
) -> None:
    second: TestClient[Any, Any] = await aiohttp_client(create_app(harness_settings, clock=clock))
    await admin_of(harness)
    receiver.secret = (await register(harness, receiver.url, ["consult.started"]))["secret"]
    # Slow answers: while one node waits for them the other claims.
    receiver.delay_s = 0.02
    for _ in range(60):
        await started_consult(harness)

    async def node(app: Any) -> int:
        # Rounds until nothing is left to send (a round may find what is due
        # being claimed by the other node at that moment, skipped, and end).
        total = 0
        while await pending(app):
            total += await deliver_due(app)
            await asyncio.sleep(0.01)
        return total

    async def pending(app: Any) -> int:
        async with app[DB_ENGINE].connect() as conn:
            found: int = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(webhook_deliveries)
                .where(webhook_deliveries.c.status == DeliveryStatus.PENDING.value)
            )
            return found

    first_node, second_node = await asyncio.gather(node(harness.app), node(second.app))
    assert first_node + second_node == 60
    assert first_node > 0
    assert second_node > 0
    assert len(receiver.unique()) == 60
    assert receiver.repeats() == {}
    async with harness.app[DB_ENGINE].connect() as conn:
        attempts = (await conn.execute(sa.select(webhook_deliveries.c.attempts))).scalars().all()
    assert set(attempts) == {1}


async def test_finished_deliveries_leave_the_history_after_its_days(
    harness: Harness, receiver: Receiver
) -> None:
    admin = await admin_of(harness)
    created = await register(harness, receiver.url, ["consult.started"])
    receiver.secret = created["secret"]
    await started_consult(harness)
    await deliver_due(harness.app)
    await started_consult(harness)  # pending: it stays whatever its age
    harness.clock.advance(30 * 86400)  # webhooks.history_days
    await purge_webhook_history(harness.app)
    await harness.logged_in(admin)
    assert len(await deliveries(harness, created["endpoint"]["id"])) == 2
    harness.clock.advance(1)
    await purge_webhook_history(harness.app)
    await harness.logged_in(admin)
    (left,) = await deliveries(harness, created["endpoint"]["id"])
    assert left["status"] == "pending"
    async with harness.app[DB_ENGINE].connect() as conn:
        assert (await conn.scalar(sa.select(sa.func.count()).select_from(webhook_events))) == 1


async def test_the_job_sends_by_itself_and_backs_off_on_the_real_clock(
    harness: Harness,
    make_settings: SettingsFactory,
    database_url: str,
    aiohttp_client: Any,
    receiver: Receiver,
) -> None:
    # A second node on the same database, on the real clock, whose job looks
    # every 0.1 s and waits 0.5 s after a first failure (then 1 s, 2 s, ...).
    node = create_app(
        make_settings(
            database_url=database_url,
            webhooks_allow_http_loopback="true",
            webhooks_poll_interval_s="0.1",
            webhooks_retry_base_s="0.5",
        )
    )
    await aiohttp_client(node)
    await admin_of(harness)
    created = await register(harness, receiver.url, ["consult.started"])
    receiver.secret = created["secret"]
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    await receiver.stop()
    made = time.monotonic()
    async with node[DB_ENGINE].begin() as conn:
        consult = await create_consult(
            conn, therapist_id=therapist.account_id, now=datetime.now(UTC)
        )
        await mark_started(conn, consult.id, now=datetime.now(UTC))
    # Down: tried at once, and again 0.5 s later. A claim counts the attempt
    # and leases the delivery for 20 s before it is sent; only once the send
    # failed is the next attempt a second away (with the receiver started
    # between the two, the second attempt would get through).
    for _ in range(100):
        async with node[DB_ENGINE].connect() as conn:
            (waiting,) = (await conn.execute(sa.select(webhook_deliveries))).all()
        if waiting.attempts >= 2 and (
            waiting.next_attempt_at - waiting.last_attempt_at < timedelta(seconds=10)
        ):
            break
        await asyncio.sleep(0.05)
    assert waiting.attempts == 2
    assert waiting.status == "pending"
    assert waiting.last_error == "could not connect"
    assert time.monotonic() - made >= 0.5

    await receiver.start()
    await receiver.wait_for(lambda r: bool(r.received), timeout_s=10)
    assert time.monotonic() - made >= 1.5  # the third attempt, 1 s after the second
    (started,) = receiver.of_type("consult.started")
    assert started["data"]["consult_id"] == str(consult.id)
    await asyncio.sleep(0.3)  # a few more rounds: nothing is sent again
    assert receiver.repeats() == {}


@pytest.mark.settings(
    webhooks_allow_http_loopback="true",
    webhooks_poll_interval_s="3600",
    webhooks_allow_private_networks="true",
)
async def test_a_practice_network_is_allowed_by_the_setting_but_never_this_machine(
    harness: Harness,
) -> None:
    await admin_of(harness)
    inside = await harness.post(
        "/api/admin/webhooks", {"url": "https://192.168.10.5/hooks", "events": ALL_EVENTS}
    )
    assert inside.status == 201, await inside.text()
    local = await harness.post(
        "/api/admin/webhooks", {"url": "https://127.0.0.2/hooks", "events": ALL_EVENTS}
    )
    assert local.status == 422


async def test_an_endpoint_on_a_port_other_than_443_is_refused_naming_port_and_setting(
    harness: Harness,
) -> None:
    # A port is another service (a mail server's 25, a database's 5432): only
    # https's own port, unless the operator lists another.
    await admin_of(harness)
    for url in ("https://mail.example.org:25/", "https://records.example.org:8443/hooks"):
        answer = await harness.post("/api/admin/webhooks", {"url": url, "events": ALL_EVENTS})
        assert answer.status == 422, await answer.text()
        message = (await answer.json())["error"]["message"]
        port = url.split(":")[2].split("/")[0]
        assert f"port {port}" in message
        assert "webhooks.allowed_ports" in message
    for url in ("https://records.example.org/hooks", "https://records.example.org:443/hooks"):
        answer = await harness.post("/api/admin/webhooks", {"url": url, "events": ALL_EVENTS})
        assert answer.status == 201, await answer.text()


@pytest.mark.settings(
    webhooks_allow_http_loopback="true",
    webhooks_poll_interval_s="3600",
    webhooks_allowed_ports="8443, 9443",
)
async def test_the_ports_the_operator_lists_are_allowed_and_no_other(harness: Harness) -> None:
    await admin_of(harness)
    for port in (8443, 9443, 443):
        url = f"https://records.example.org:{port}/hooks"
        answer = await harness.post("/api/admin/webhooks", {"url": url, "events": ALL_EVENTS})
        assert answer.status == 201, await answer.text()
    refused = await harness.post(
        "/api/admin/webhooks", {"url": "https://records.example.org:8080/", "events": ALL_EVENTS}
    )
    assert refused.status == 422
    assert "port 8080" in (await refused.json())["error"]["message"]


async def test_an_endpoint_whose_port_is_no_longer_allowed_fails_at_the_send(
    harness: Harness,
) -> None:
    # Registered while webhooks.allowed_ports listed 8443; the operator has
    # since taken it out. The send checks the port again, as it does the host.
    await admin_of(harness)
    created = await register(harness, "https://records.praktijk-noord.example/hooks")
    async with harness.app[DB_ENGINE].begin() as conn:
        await conn.execute(
            webhook_endpoints.update().values(url="https://93.184.215.14:8443/hooks")
        )
    await started_consult(harness)
    assert await deliver_due(harness.app) == 1
    (refused,) = await deliveries(harness, created["endpoint"]["id"])
    assert refused["status"] == "pending"
    assert refused["last_status_code"] is None
    assert "port 8443" in refused["last_error"]
    assert "webhooks.allowed_ports" in refused["last_error"]


async def test_an_address_no_longer_allowed_is_not_sent_to(harness: Harness) -> None:
    # Found while adding the port check: an address in the URL (no name to
    # resolve) was checked only at registration; aiohttp skips the resolver
    # for it, so a private address registered while
    # webhooks.allow_private_networks was on was still sent to after the
    # operator turned it off.
    await admin_of(harness)
    created = await register(harness, "https://records.praktijk-noord.example/hooks")
    async with harness.app[DB_ENGINE].begin() as conn:
        await conn.execute(webhook_endpoints.update().values(url="https://10.1.2.3/hooks"))
    await started_consult(harness)
    assert await deliver_due(harness.app) == 1
    (refused,) = await deliveries(harness, created["endpoint"]["id"])
    assert refused["last_status_code"] is None
    assert "a private network" in refused["last_error"]


async def test_a_host_name_that_resolves_to_this_machine_is_not_sent_to(
    harness: Harness, receiver: Receiver
) -> None:
    await admin_of(harness)
    created = await register(harness, "https://records.praktijk-noord.example/hooks")
    # The name now resolves to this machine (DNS rebinding, or a name made
    # for it): the check at registration cannot see that; the send's can.
    async with harness.app[DB_ENGINE].begin() as conn:
        await conn.execute(webhook_endpoints.update().values(url="https://localhost/hooks"))
    await started_consult(harness)
    assert await deliver_due(harness.app) == 1
    (refused,) = await deliveries(harness, created["endpoint"]["id"])
    assert refused["last_error"] == "the host name resolves to no address a webhook may go to"
    assert receiver.received == []
    assert receiver.refused == []


async def test_an_endpoint_that_takes_fhir_gets_consult_events_as_an_encounter(
    harness: Harness, receiver: Receiver
) -> None:
    await admin_of(harness)
    answer = await harness.post(
        "/api/admin/webhooks", {"url": receiver.url, "events": ALL_EVENTS, "payload": "fhir"}
    )
    assert answer.status == 201, await answer.text()
    created = await answer.json()
    assert created["endpoint"]["payload"] == "fhir"
    receiver.secret = created["secret"]
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(
            conn, therapist_id=therapist.account_id, now=harness.clock.now()
        )
        await mark_started(conn, consult.id, now=harness.clock.now())
    harness.clock.advance(20 * 60)
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_ended(conn, consult.id, now=harness.clock.now(), end_reason="both_left")
    recording_id = await stored_recording(harness, str(consult.id), b"\x1a\x45\xdf\xa3 media")

    assert await deliver_due(harness.app) == 3
    assert receiver.refused == []  # signed as every message is
    by_type = {entry.headers["Content-Type"]: entry for entry in receiver.received}
    encounters = [
        Encounter.model_validate(entry.message)
        for entry in receiver.received
        if entry.headers["Content-Type"] == "application/fhir+json"
    ]
    assert [encounter.status for encounter in encounters] == ["in-progress", "finished"]
    finished = encounters[1].model_dump(mode="json", by_alias=True, exclude_none=True)
    assert finished["id"] == str(consult.id)
    assert finished["class"]["code"] == "VR"
    assert finished["length"]["value"] == 20 * 60
    assert "subject" not in finished  # nothing about the patient
    pseudonym = TherapistPseudonyms(harness.app[MASTER_KEY].key).of(therapist.account_id)
    assert finished["participant"][0]["individual"]["identifier"]["value"] == pseudonym
    # A recording's event has no Encounter: it goes as Standard Webhooks' JSON.
    standard = by_type["application/json"].message
    assert (standard["type"], standard["data"]["recording_id"]) == (
        "recording.available",
        str(recording_id),
    )


async def test_an_unknown_payload_is_refused_naming_it(harness: Harness) -> None:
    await admin_of(harness)
    answer = await harness.post(
        "/api/admin/webhooks",
        {"url": "https://93.184.216.34/hooks", "events": ["consult.ended"], "payload": "hl7v2"},
    )
    assert answer.status == 422
    assert "payload" in (await answer.json())["error"]["message"]


async def test_a_send_that_breaks_unexpectedly_is_an_attempt_and_stops_no_other_delivery(
    harness: Harness, receiver: Receiver
) -> None:
    # Found in review: an exception other than a client error (an endpoint's
    # host name that aiohttp cannot encode) escaped the send, left the
    # delivery pending for good and ended the round for every organisation.
    admin = await admin_of(harness)
    broken = await register(harness, receiver.url, ["consult.started"])
    working = await register(harness, receiver.url, ["consult.started"])
    receiver.secret = working["secret"]
    async with harness.app[DB_ENGINE].begin() as conn:
        await conn.execute(
            webhook_endpoints.update()
            .where(webhook_endpoints.c.id == uuid.UUID(broken["endpoint"]["id"]))
            .values(url="https://a..b/hooks")  # as if registered before the check
        )
    await started_consult(harness)
    assert await deliver_due(harness.app) == 2
    assert len(receiver.received) == 1  # the working endpoint got its message
    await harness.logged_in(admin)
    (attempt,) = await deliveries(harness, broken["endpoint"]["id"])
    assert attempt["status"] == "pending"
    assert attempt["attempts"] == 1
    assert attempt["last_error"] == "the message could not be sent (UnicodeError)"
    # Past the retries' deadline it fails for good, as any delivery does.
    harness.clock.advance(25 * 3600)
    assert await deliver_due(harness.app) == 1
    await harness.logged_in(admin)
    (failed,) = await deliveries(harness, broken["endpoint"]["id"])
    assert failed["status"] == "failed"


@pytest.mark.settings(
    webhooks_allow_http_loopback="true",
    webhooks_poll_interval_s="3600",
    webhooks_retry_base_s="30",
)
async def test_the_retention_purge_takes_the_webhook_history_of_what_it_purges(
    harness: Harness, receiver: Receiver
) -> None:
    # Found in review: the deliveries' history named a purged consult with
    # its start and end times for webhooks.history_days (30) after the
    # organisation's retention (here 1 day) had destroyed its record.
    admin = await admin_of(harness)
    created = await register(harness, receiver.url)
    receiver.secret = created["secret"]
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(
            conn, therapist_id=therapist.account_id, now=harness.clock.now()
        )
        await mark_started(conn, consult.id, now=harness.clock.now())
        await mark_ended(conn, consult.id, now=harness.clock.now(), end_reason="both_left")
    recording_id = await stored_recording(harness, str(consult.id), b"\x1a\x45\xdf\xa3 media")
    assert await deliver_due(harness.app) == 3
    harness.clock.advance(2 * 86400)
    async with harness.app[DB_ENGINE].begin() as conn:
        report = await purge(conn, now=harness.clock.now(), defaults=Retention(1, 1, 365))
    assert (report.consults, report.recordings) == (1, 1)
    async with harness.app[DB_ENGINE].connect() as conn:
        left = (
            await conn.execute(sa.select(webhook_events.c.type, webhook_events.c.subject_id))
        ).all()
    # Only the news that the recording is gone is left, to be sent.
    assert [(row.type, row.subject_id) for row in left] == [("recording.deleted", recording_id)]
    await harness.logged_in(admin)
    subjects = {
        entry["subject_id"] for entry in await deliveries(harness, created["endpoint"]["id"])
    }
    assert subjects == {str(recording_id)}


async def test_an_attempt_another_node_took_over_is_reported_as_superseded(
    harness: Harness, receiver: Receiver
) -> None:
    # Found in review: the node whose claim ran out still reported its late
    # result as the delivery's status (logged "failed for good", counted in
    # /metrics) although its update matched no row.
    await admin_of(harness)
    await register(harness, receiver.url, ["consult.started"])
    await started_consult(harness)
    async with harness.app[DB_ENGINE].begin() as conn:
        (first,) = await claim_due(conn, now=harness.clock.now(), lease_s=20, limit=5)
    harness.clock.advance(21)  # the first node's claim ran out
    async with harness.app[DB_ENGINE].begin() as conn:
        (second,) = await claim_due(conn, now=harness.clock.now(), lease_s=20, limit=5)
    assert (first.id, first.attempt, second.attempt) == (second.id, 1, 2)
    now = harness.clock.now()
    async with harness.app[DB_ENGINE].begin() as conn:
        late = await record_attempt(
            conn,
            first,
            status_code=500,
            error="answered HTTP 500",
            now=now,
            retry_base_s=30.0,
            retry_for_s=0.0,
        )
        assert late is None  # superseded: nothing recorded
        current = await record_attempt(
            conn, second, status_code=None, error="x", now=now, retry_base_s=30.0, retry_for_s=0.0
        )
        assert current is DeliveryStatus.FAILED
