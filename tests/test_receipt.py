"""The patient's receipt: a link from the invite's page that shows the consult's
times, its recording and who looked at its record; only the token's hash is
stored, nothing of another consult shows, and it goes with the consult's record."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from audit.clock import ManualClock
from audit.consults import mark_ended, mark_started
from audit.practice import PracticeSettings, set_practice_settings
from audit.receipts import RECEIPTS_PER_CONSULT
from audit.retention import Retention, purge
from audit.roles import Role
from audit.schema import access_log, accounts, metadata, receipts
from audit.sealing import token_hash
from server import create_app
from server.app_keys import DB_ENGINE
from server.webhooks import deliver_due
from tests.support.harness import ConsultSetup, Harness, new_consult, stored_recording
from tests.support.settings import SettingsFactory
from tests.support.webhooks import Receiver

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
RETENTION = Retention(consult_days=90, recording_days=30, access_log_days=1825)


async def start(harness: Harness, consult_id: str) -> None:
    """The patient admitted, as the rooms record it."""
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_started(conn, uuid.UUID(consult_id), now=harness.clock.now())


async def end(harness: Harness, consult_id: str) -> None:
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_ended(conn, uuid.UUID(consult_id), now=harness.clock.now())


async def receipt_for(harness: Harness, setup: ConsultSetup) -> str:
    """The receipt the patient's page asks for with its invite link once admitted."""
    response = await harness.issue_receipt(setup.invite_token, setup.consult_id)
    assert response.status == 201, await response.text()
    body = await response.json()
    assert body["receipt_url"] == f"{harness.origin}/receipt/{body['receipt_token']}"
    token: str = body["receipt_token"]
    return token


async def started_with_receipt(harness: Harness, setup: ConsultSetup) -> str:
    await start(harness, setup.consult_id)
    return await receipt_for(harness, setup)


async def read(harness: Harness, token: str) -> Any:
    response = await harness.client.get(f"/api/receipts/{token}")
    assert response.status == 200, await response.text()
    return await response.json()


async def test_the_receipt_shows_the_times_and_who_looked_at_the_record(
    harness: Harness,
) -> None:
    setup = await new_consult(harness)
    started = harness.clock.now()
    token = await started_with_receipt(harness, setup)
    harness.clock.advance(25 * 60)
    await end(harness, setup.consult_id)
    await harness.logged_in(setup.therapist)  # the session went idle meanwhile
    assert (await harness.client.get(f"/api/consults/{setup.consult_id}")).status == 200
    support = await harness.professional("sam@praktijk-noord.example", Role.SUPPORT)
    await harness.logged_in(support)
    technical = await harness.client.get(f"/api/support/consults/{setup.consult_id}/technical-log")
    assert technical.status == 200
    harness.client.session.cookie_jar.clear()  # the patient has no session

    receipt = await read(harness, token)
    assert receipt["consult"] == {
        "status": "ended",
        "started_at": started.isoformat(),
        "ended_at": (started + timedelta(minutes=25)).isoformat(),
        "duration_s": 25 * 60,
    }
    assert receipt["recording"] == {"recorded": False, "exists": False}
    assert receipt["truncated"] is False
    seen = [(a["role"], a["pseudonym"], a["action"], a["outcome"]) for a in receipt["accesses"]]
    therapist = str(setup.therapist.account_id)
    assert seen == [
        ("therapist", therapist, "consult.create", "allowed"),
        ("therapist", therapist, "consult.read", "allowed"),
        ("support", str(support.account_id), "support.technical_log.read", "allowed"),
        ("patient", None, "receipt.read", "allowed"),
    ]
    assert [a["at"] for a in receipt["accesses"]] == sorted(a["at"] for a in receipt["accesses"])
    # Nothing else: no ids of the consult or its organisation, no e-mail address.
    text = str(receipt)
    for secret in (setup.consult_id, setup.therapist.email, str(setup.therapist.organisation.id)):
        assert secret not in text


async def test_the_read_is_access_logged_as_the_patients(harness: Harness) -> None:
    setup = await new_consult(harness)
    token = await started_with_receipt(harness, setup)
    harness.client.session.cookie_jar.clear()
    await read(harness, token)
    async with harness.app[DB_ENGINE].connect() as conn:
        last = (
            await conn.execute(sa.select(access_log).order_by(access_log.c.id.desc()).limit(1))
        ).one()
    assert (last.action, last.actor_role, last.actor_id, last.client_type) == (
        "receipt.read",
        "patient",
        None,
        "api",
    )
    assert (last.object_type, last.object_id) == ("consult", setup.consult_id)
    assert last.organisation_id == setup.therapist.organisation.id


async def test_only_the_tokens_hash_is_stored(harness: Harness) -> None:
    setup = await new_consult(harness)
    token = await started_with_receipt(harness, setup)
    await read(harness, token)
    async with harness.app[DB_ENGINE].connect() as conn:
        stored = (await conn.execute(sa.select(receipts))).all()
        assert [(row.token_hash, str(row.consult_id)) for row in stored] == [
            (token_hash(token), setup.consult_id)
        ]
        # No time: when the patient's page asked would say when the patient was there.
        assert set(stored[0]._mapping) == {"id", "token_hash", "consult_id"}
        for table in metadata.sorted_tables:
            for row in (await conn.execute(sa.select(table))).all():
                assert token not in str(tuple(row)), table.name


async def test_another_consults_records_never_appear(harness: Harness) -> None:
    mine = await new_consult(harness)
    token = await started_with_receipt(harness, mine)
    other = await harness.post("/api/consults", {})
    other_id = (await other.json())["consult"]["id"]
    assert (await harness.client.get(f"/api/consults/{other_id}")).status == 200
    recording_id = await stored_recording(harness, other_id, b"media")
    download = await harness.client.get(f"/api/recordings/{recording_id}/download")
    assert download.status == 200
    await download.read()
    other_token = await started_with_receipt(
        harness, ConsultSetup(mine.therapist, other_id, (await other.json())["invite_token"])
    )
    receipt = await read(harness, token)
    assert [a["action"] for a in receipt["accesses"]] == ["consult.create", "receipt.read"]
    assert receipt["recording"] == {"recorded": False, "exists": False}
    # The other's receipt has its own records, and not this one's read.
    theirs = await read(harness, other_token)
    assert [a["action"] for a in theirs["accesses"]] == [
        "consult.create",
        "consult.read",
        "recording.download",
        "receipt.read",
    ]


async def test_the_recording_and_who_played_it_stay_on_the_receipt_after_it_is_deleted(
    harness: Harness,
) -> None:
    setup = await new_consult(harness)
    token = await started_with_receipt(harness, setup)
    recording_id = await stored_recording(harness, setup.consult_id, b"media")
    download = await harness.client.get(f"/api/recordings/{recording_id}/download")
    assert download.status == 200
    await download.read()
    assert (await read(harness, token))["recording"] == {"recorded": True, "exists": True}
    deleted = await harness.client.delete(
        f"/api/recordings/{recording_id}", headers=harness.headers
    )
    assert deleted.status == 204
    receipt = await read(harness, token)
    assert receipt["recording"] == {"recorded": True, "exists": False}
    assert [a["action"] for a in receipt["accesses"]] == [
        "consult.create",
        "recording.download",
        "receipt.read",
        "recording.delete",
        "receipt.read",
    ]


@pytest.mark.settings(webhooks_allow_http_loopback="true", webhooks_poll_interval_s="3600")
async def test_the_receipt_lists_each_message_sent_to_the_practices_record_system(
    harness: Harness, free_port: int
) -> None:
    # The record system hears of the consult's start and end (its times, the
    # therapist's pseudonym): two disclosures, on the patient's receipt as
    # the system's, named by the endpoint's id.
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    receiver = Receiver(free_port)
    await receiver.start()
    try:
        answer = await harness.post(
            "/api/admin/webhooks",
            {"url": receiver.url, "events": ["consult.started", "consult.ended"]},
        )
        assert answer.status == 201, await answer.text()
        created = await answer.json()
        receiver.secret = created["secret"]
        setup = await new_consult(harness)
        token = await started_with_receipt(harness, setup)
        harness.clock.advance(20 * 60)
        await end(harness, setup.consult_id)
        assert await deliver_due(harness.app) == 2
        assert len(receiver.unique()) == 2
    finally:
        await receiver.stop()
    harness.client.session.cookie_jar.clear()
    receipt = await read(harness, token)
    seen = [(a["role"], a["pseudonym"], a["action"], a["outcome"]) for a in receipt["accesses"]]
    endpoint = created["endpoint"]["id"]
    assert seen == [
        ("therapist", str(setup.therapist.account_id), "consult.create", "allowed"),
        ("system", endpoint, "webhook.delivered", "allowed"),
        ("system", endpoint, "webhook.delivered", "allowed"),
        ("patient", None, "receipt.read", "allowed"),
    ]
    assert receiver.url not in str(receipt)


async def test_after_the_retention_purge_of_the_consult_the_receipt_is_unknown(
    harness: Harness,
) -> None:
    setup = await new_consult(harness)
    token = await started_with_receipt(harness, setup)
    harness.clock.advance(20 * 60)
    await end(harness, setup.consult_id)
    await read(harness, token)
    page = await harness.client.get(f"/receipt/{token}", headers=BROWSER)
    assert (page.status, page.content_type) == (200, "text/html")
    assert "unsafe-inline" not in page.headers["Content-Security-Policy"]
    harness.clock.advance(89 * 86400)
    async with harness.app[DB_ENGINE].begin() as conn:
        assert (await purge(conn, now=harness.clock.now(), defaults=RETENTION)).consults == 0
    await read(harness, token)  # still within the retention
    harness.clock.advance(2 * 86400)
    async with harness.app[DB_ENGINE].begin() as conn:
        assert (await purge(conn, now=harness.clock.now(), defaults=RETENTION)).consults == 1
    gone = await harness.client.get(f"/api/receipts/{token}")
    assert gone.status == 404
    assert (await gone.json())["error"]["code"] == "receipt_unknown"
    page = await harness.client.get(f"/receipt/{token}", headers=BROWSER)
    assert page.status == 404
    assert page.content_type == "text/html"
    assert 'src="/static/js/receipt.js"' in await page.text()
    async with harness.app[DB_ENGINE].connect() as conn:
        assert (await conn.execute(sa.select(receipts))).all() == []


async def test_an_unknown_receipt_is_a_clear_404_page_for_browsers_json_for_others(
    sqlite_harness: Harness,
) -> None:
    harness = sqlite_harness
    for token in ("A" * 43, "short", "not%20a%20token"):
        api = await harness.client.get(f"/api/receipts/{token}", headers=BROWSER)
        assert api.status == 404
        assert (await api.json())["error"]["code"] == "receipt_unknown"
        page = await harness.client.get(f"/receipt/{token}", headers=BROWSER)
        assert (page.status, page.content_type) == (404, "text/html")
        plain = await harness.client.get(f"/receipt/{token}", headers={"Accept": "*/*"})
        assert plain.status == 404
        assert (await plain.json())["error"]["code"] == "receipt_unknown"


async def test_a_receipt_is_issued_only_once_the_consult_started_and_while_the_invite_works(
    harness: Harness,
) -> None:
    setup = await new_consult(harness)
    unknown = await harness.issue_receipt("B" * 43, setup.consult_id)
    assert (unknown.status, (await unknown.json())["error"]["code"]) == (404, "invite_unknown")
    # Not while the patient waits: a receipt would tell that they came.
    early = await harness.issue_receipt(setup.invite_token, setup.consult_id)
    assert (early.status, (await early.json())["error"]["code"]) == (409, "consult_not_started")
    token = await started_with_receipt(harness, setup)
    harness.clock.advance(5 * 60)
    await end(harness, setup.consult_id)
    over = await harness.issue_receipt(setup.invite_token, setup.consult_id)
    assert over.status in (404, 410)
    # The invite is gone with the consult's end; the receipt stays.
    assert (await read(harness, token))["consult"]["status"] == "ended"
    no_origin = await harness.client.post(f"/api/invites/{setup.invite_token}/receipt")
    assert no_origin.status == 403


async def test_a_consult_keeps_only_its_newest_receipts(harness: Harness) -> None:
    setup = await new_consult(harness)
    await start(harness, setup.consult_id)
    tokens = [await receipt_for(harness, setup) for _ in range(RECEIPTS_PER_CONSULT + 1)]
    assert (await harness.client.get(f"/api/receipts/{tokens[0]}")).status == 404
    for token in tokens[1:]:
        await read(harness, token)


async def test_the_receipt_outlives_the_therapists_erasure(harness: Harness) -> None:
    setup = await new_consult(harness)
    token = await started_with_receipt(harness, setup)
    harness.clock.advance(30 * 60)
    await end(harness, setup.consult_id)
    harness.client.session.cookie_jar.clear()
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    erased = await harness.post(f"/api/admin/accounts/{setup.therapist.account_id}/erase")
    assert erased.status == 200, await erased.text()
    async with harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(accounts)) == 1
    receipt = await read(harness, token)
    assert receipt["consult"]["duration_s"] == 30 * 60
    assert [a["action"] for a in receipt["accesses"]] == ["consult.create", "receipt.read"]


async def test_receipts_count_against_the_clients_limit(
    make_settings: SettingsFactory, clock: ManualClock, aiohttp_client: Any
) -> None:
    settings = make_settings(security_client_requests_per_min=3)
    client = await aiohttp_client(create_app(settings, clock=clock))
    for path in ("/api/receipts/" + "C" * 43, "/receipt/" + "C" * 43, "/api/receipts/x"):
        assert (await client.get(path)).status == 404
    refused = await client.get("/receipt/" + "C" * 43)
    assert refused.status == 429
    assert "Retry-After" in refused.headers


async def test_the_receipt_lists_the_lists_and_exports_that_showed_the_patients_details(
    harness: Harness,
) -> None:
    """The therapist's list showed the patient's label, the admin's billing
    export the appointment reference: reads of this consult's personal data,
    so the receipt lists them (found by a review: they were recorded against
    the therapist and the organisation only). A consult in the same list
    without a label gets no such record."""
    organisation = await harness.organisation()
    async with harness.app[DB_ENGINE].begin() as conn:
        chosen = PracticeSettings(True, None, appointment_reference_allowed=True)
        await set_practice_settings(conn, organisation.id, chosen, now=harness.clock.now())
    setup = await new_consult(
        harness, display_name="Jan Jansen", appointment_reference="APPT-12345"
    )
    other = await harness.post("/api/consults", {})
    assert other.status == 201, await other.text()
    unlabelled = (await other.json())["consult"]["id"]
    token = await started_with_receipt(harness, setup)
    listed = await harness.client.get("/api/consults")
    assert "Jan Jansen" in await listed.text()
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    month = harness.clock.now().strftime("%Y-%m")
    billing = await harness.client.get("/api/admin/billing", params={"month": month})
    assert "APPT-12345" in await billing.text()
    harness.client.session.cookie_jar.clear()

    receipt = await read(harness, token)
    seen = [(a["role"], a["pseudonym"], a["action"]) for a in receipt["accesses"]]
    therapist = str(setup.therapist.account_id)
    assert ("therapist", therapist, "consult.list") in seen
    assert ("admin", str(admin.account_id), "billing.export") in seen
    async with harness.app[DB_ENGINE].connect() as conn:
        about_unlabelled = (
            await conn.execute(
                sa.select(access_log.c.action).where(access_log.c.object_id == unlabelled)
            )
        ).all()
    assert [row.action for row in about_unlabelled] == ["consult.create"]
