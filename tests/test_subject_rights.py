"""A professional's export of everything held, and erasure on request."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest
import sqlalchemy as sa

from audit.access_log import verify_chain
from audit.consults import create_consult, mark_started
from audit.recordings import Consent, ConsentBy, finish_recording, start_recording
from audit.roles import Role
from audit.schema import access_log, consults, metadata, webhook_events
from audit.sealing import keyed_hash
from audit.webhooks import EventType, add_endpoint
from server.app_keys import DB_ENGINE, FILE_STORE, MASTER_KEY, TECHNICAL_LOG
from tests.support.harness import Harness, new_consult


async def everything_stored(harness: Harness) -> str:
    """Every row of every table, as text."""
    await harness.app[TECHNICAL_LOG].flush(harness.app[DB_ENGINE])
    dump = []
    async with harness.app[DB_ENGINE].connect() as conn:
        for table in metadata.sorted_tables:
            rows = (await conn.execute(sa.select(table))).all()
            dump.append(f"{table.name}: {rows!r}")
    return "\n".join(dump)


async def record_something(harness: Harness, consult_id: uuid.UUID) -> None:
    """A finished recording of the consult, made as the recorder makes one."""
    now = harness.clock.now()
    async with harness.app[DB_ENGINE].begin() as conn:
        recording, writer = await start_recording(
            conn,
            harness.app[FILE_STORE],
            harness.app[MASTER_KEY].key,
            consult_id,
            now=now,
            consent=Consent(now, now, ConsentBy.PATIENT),
        )
        writer.write(b"media")
        await finish_recording(conn, recording.id, writer, now=now)


async def test_a_professional_downloads_everything_held_about_them(harness: Harness) -> None:
    first = await new_consult(harness, display_name="Mevr. J.")
    second = await harness.post("/api/consults", {})
    await record_something(harness, uuid.UUID(first.consult_id))
    response = await harness.client.get("/api/account/export")
    assert response.status == 200
    assert "attachment" in response.headers["Content-Disposition"]
    exported = await response.json()
    account = exported["account"]
    assert account["email"] == first.therapist.email
    assert account["role"] == "therapist"
    assert account["organisation"]["name"] == "Praktijk Noord"
    assert account["credentials"] == {
        "password_hash_stored": True,
        "totp_secret_stored_encrypted": True,
    }
    # Credentials are named, never copied out.
    assert "$argon2" not in str(exported)
    assert first.therapist.secret not in str(exported)
    assert {c["id"] for c in exported["consults"]} == {
        first.consult_id,
        (await second.json())["consult"]["id"],
    }
    # The metadata of a recording of one's consult (consent included), not its media.
    assert [r["consult_id"] for r in exported["recordings"]] == [first.consult_id]
    assert exported["recordings"][0]["consent_by"] == "patient"
    assert exported["recordings"][0]["status"] == "complete"
    actions = [record["action"] for record in exported["access_log"]]
    assert "session.login" in actions
    assert actions.count("consult.create") == 2
    assert actions[-1] == "account.export"
    assert len(exported["sessions"]) == 1
    # The waiting-room name is not stored, so it is not in the export either.
    assert "Mevr. J." not in str(exported)


async def test_the_export_holds_the_failed_logins_at_ones_address_and_no_one_elses(
    harness: Harness,
) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    wrong = {"email": anna.email, "password": "wrong password!!", "code": "000000"}
    first_at = harness.clock.now()
    assert (await harness.post("/api/login", wrong)).status == 401
    harness.clock.advance(60)
    second_at = harness.clock.now()
    # Typed differently, the same address: counted, and so held, as one.
    retyped = {**wrong, "email": "  Anna@Praktijk-Noord.example"}
    assert (await harness.post("/api/login", retyped)).status == 401
    elses = {**wrong, "email": "bram@praktijk-noord.example"}
    assert (await harness.post("/api/login", elses)).status == 401
    harness.clock.advance(60)
    await harness.logged_in(anna)  # a login that succeeds is no failure

    exported = await (await harness.client.get("/api/account/export")).json()
    failures = exported["login_failures"]
    assert [datetime.fromisoformat(f["failed_at"]) for f in failures] == [first_at, second_at]
    # Held under keyed hashes of the address and of the client's address:
    # said, not copied out.
    assert all(set(failure) == {"failed_at"} for failure in failures)
    subject_hash = keyed_hash(harness.app[MASTER_KEY].key, "login-subject", anna.email)
    assert subject_hash not in str(exported)


@pytest.mark.settings(webhooks_poll_interval_s="3600")  # nothing sent meanwhile
async def test_the_export_holds_the_webhook_messages_that_will_name_one(
    harness: Harness,
) -> None:
    setup = await new_consult(harness)
    colleague = await harness.professional("bram@praktijk-noord.example", Role.THERAPIST)
    organisation = await harness.organisation()
    async with harness.app[DB_ENGINE].begin() as conn:
        endpoint, secret = await add_endpoint(
            conn,
            harness.app[MASTER_KEY].key,
            organisation.id,
            url="https://records.praktijk-noord.example/hooks",
            events=(EventType.CONSULT_STARTED,),
            now=harness.clock.now(),
        )
        colleagues = await create_consult(
            conn, therapist_id=colleague.account_id, now=harness.clock.now()
        )
        await mark_started(conn, uuid.UUID(setup.consult_id), now=harness.clock.now())
        await mark_started(conn, colleagues.id, now=harness.clock.now())

    exported = await (await harness.client.get("/api/account/export")).json()
    (event,) = exported["webhook_events"]
    assert event["type"] == "consult.started"
    assert event["about"] == setup.consult_id
    assert datetime.fromisoformat(event["created_at"]) == harness.clock.now()
    assert event["data"]["consult_id"] == setup.consult_id
    assert event["data"]["status"] == "active"
    assert [
        (delivery["endpoint_id"], delivery["status"], delivery["attempts"])
        for delivery in event["deliveries"]
    ] == [(str(endpoint.id), "pending", 0)]
    # Not the colleague's message, and not the endpoint's signing secret.
    assert str(colleagues.id) not in str(exported)
    assert secret not in str(exported)


@pytest.mark.settings(webhooks_poll_interval_s="3600")
async def test_erasure_unlinks_the_pending_webhook_messages_from_the_account(
    harness: Harness,
) -> None:
    setup = await new_consult(harness)
    organisation = await harness.organisation()
    async with harness.app[DB_ENGINE].begin() as conn:
        await add_endpoint(
            conn,
            harness.app[MASTER_KEY].key,
            organisation.id,
            url="https://records.praktijk-noord.example/hooks",
            events=(EventType.CONSULT_STARTED,),
            now=harness.clock.now(),
        )
        await mark_started(conn, uuid.UUID(setup.consult_id), now=harness.clock.now())
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    response = await harness.post(f"/api/admin/accounts/{setup.therapist.account_id}/erase")
    assert response.status == 200, await response.text()
    async with harness.app[DB_ENGINE].connect() as conn:
        events = (await conn.execute(sa.select(webhook_events))).all()
    # The message about the consult still goes (the record stays, pseudonymous),
    # naming no therapist.
    assert [(event.subject_id, event.therapist_id) for event in events] == [
        (uuid.UUID(setup.consult_id), None)
    ]


async def test_erasure_leaves_no_trace_and_keeps_the_consults_pseudonymous(
    harness: Harness,
) -> None:
    setup = await new_consult(harness, email="bram@praktijk-noord.example")
    bram = setup.therapist
    # A failed login leaves a lockout counter and a technical-log entry.
    failed = await harness.post(
        "/api/login", {"email": bram.email, "password": "wrong password!!", "code": "000000"}
    )
    assert failed.status == 401
    subject_hash = keyed_hash(harness.app[MASTER_KEY].key, "login-subject", bram.email)
    assert subject_hash in await everything_stored(harness)

    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    response = await harness.post(f"/api/admin/accounts/{bram.account_id}/erase")
    assert response.status == 200, await response.text()
    erased = (await response.json())["erased"]
    assert erased["consults_unlinked"] == 1
    assert erased["login_failures"] >= 1
    assert erased["technical_entries"] >= 1

    stored = await everything_stored(harness)
    assert bram.email not in stored
    assert "bram" not in stored
    assert subject_hash not in stored
    assert (await harness.client.get(f"/api/admin/accounts/{bram.account_id}")).status == 404
    assert (await harness.login(bram)).status == 401
    async with harness.app[DB_ENGINE].connect() as conn:
        row = (await conn.execute(sa.select(consults))).one()
        assert (str(row.id), row.therapist_id, row.status) == (setup.consult_id, None, "created")
        chain = await verify_chain(conn)
        erase = (
            await conn.execute(sa.select(access_log).where(access_log.c.action == "account.erase"))
        ).one()
    assert chain.intact
    assert (erase.object_id, erase.actor_id, erase.outcome) == (
        str(bram.account_id),
        admin.account_id,
        "allowed",
    )


async def test_the_last_admin_is_not_erased_and_others_may_not_erase(
    sqlite_harness: Harness,
) -> None:
    harness = sqlite_harness
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    refused = await harness.post(f"/api/admin/accounts/{admin.account_id}/erase")
    assert refused.status == 409
    assert "last active admin" in (await refused.json())["error"]["message"]
    therapist = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(therapist)
    forbidden = await harness.post(f"/api/admin/accounts/{admin.account_id}/erase")
    assert forbidden.status == 403
    async with harness.app[DB_ENGINE].connect() as conn:
        last = (
            await conn.execute(sa.select(access_log).order_by(access_log.c.seq.desc()).limit(1))
        ).one()
    assert (last.action, last.outcome, last.actor_id) == (
        "account.erase",
        "refused",
        therapist.account_id,
    )
