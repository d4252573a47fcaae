"""A professional's export of everything held, and erasure on request."""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from audit.access_log import verify_chain
from audit.recordings import Consent, ConsentBy, finish_recording, start_recording
from audit.roles import Role
from audit.schema import access_log, consults, metadata
from audit.sealing import keyed_hash
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
