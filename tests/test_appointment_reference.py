"""The practice's appointment reference (issue 21, item 4): allowed per
practice, attached when a consult is made, sealed apart from its record,
added to ``consult.started`` and ``consult.ended`` only as they are sent (to
a real receiver that verifies every signature), destroyed once they are
delivered (or at the end, when no endpoint takes them), and in the billing
export while it exists; on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from audit.clock import ManualClock
from audit.consults import create_consult, mark_ended, mark_started
from audit.practice import PracticeSettings, practice_settings_of, set_practice_settings
from audit.retention import Retention, purge
from audit.roles import Role
from audit.schema import access_log, appointment_references, consults, webhook_events
from server.app_keys import DB_ENGINE
from server.housekeeping import purge_expired
from server.webhooks import deliver_due
from tests.support.cli import cli_env, run_cli
from tests.support.databases import QUICK_ON_SQLITE
from tests.support.harness import (
    Harness,
    Professional,
    Sockets,
    admitted_pair,
    new_consult,
    receive,
)
from tests.support.ports import unused_port
from tests.support.traces import traces
from tests.support.webhooks import Receiver, running_receiver

pytestmark = pytest.mark.settings(
    webhooks_allow_http_loopback="true",
    webhooks_poll_interval_s="3600",
    webhooks_retry_base_s="30",
)

# As a record system might number an appointment; found nowhere it should not be.
REFERENCE = "AFSPRAAK-2026-0042/Zwaluw"
NEEDLE = {"reference": REFERENCE.encode()}
CONSULT_EVENTS = ["consult.started", "consult.ended"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC).replace(microsecond=0))  # for the tokens' checks


@pytest.fixture
async def receiver(free_port: int) -> AsyncIterator[Receiver]:
    async with running_receiver(free_port) as found:
        yield found


@pytest.fixture
async def fhir_receiver() -> AsyncIterator[Receiver]:
    """A second record system, which takes FHIR (a port of its own)."""
    port = unused_port()
    async with running_receiver(port) as found:
        yield found


async def admin_of(harness: Harness) -> Professional:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    return admin


async def allow_references(harness: Harness, allowed: bool = True) -> None:
    organisation = await harness.organisation()
    async with harness.app[DB_ENGINE].begin() as conn:
        chosen = PracticeSettings(True, None, appointment_reference_allowed=allowed)
        await set_practice_settings(conn, organisation.id, chosen, now=harness.clock.now())


async def register(
    harness: Harness, receiver: Receiver, events: list[str], payload: str = "standard"
) -> str:
    """An endpoint of the receiver's, registered by the (logged-in) admin; its id."""
    answer = await harness.post(
        "/api/admin/webhooks", {"url": receiver.url, "events": events, "payload": payload}
    )
    assert answer.status == 201, await answer.text()
    created = await answer.json()
    receiver.secret = created["secret"]
    endpoint_id: str = created["endpoint"]["id"]
    return endpoint_id


async def kept(harness: Harness) -> int:
    """How many appointment references are stored."""
    async with harness.app[DB_ENGINE].connect() as conn:
        count = await conn.scalar(sa.select(sa.func.count()).select_from(appointment_references))
    return int(count or 0)


async def with_reference(harness: Harness) -> str:
    """A consult made through the API with :data:`REFERENCE`; its id."""
    setup = await new_consult(harness, appointment_reference=REFERENCE)
    return setup.consult_id


async def start_and_end(harness: Harness, consult_id: str, minutes: int = 20) -> None:
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_started(conn, uuid.UUID(consult_id), now=harness.clock.now())
    harness.clock.advance(minutes * 60)
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_ended(
            conn, uuid.UUID(consult_id), now=harness.clock.now(), end_reason="both_left"
        )


@dataclass
class Ended:
    """A consult made with :data:`REFERENCE` and ended; its ``consult.ended``
    not sent yet to the receiver's endpoint."""

    admin: Professional
    endpoint_id: str
    consult_id: str


async def ended_with_message_pending(harness: Harness, receiver: Receiver) -> Ended:
    await allow_references(harness)
    admin = await admin_of(harness)
    endpoint_id = await register(harness, receiver, ["consult.ended"])
    consult_id = await with_reference(harness)
    await start_and_end(harness, consult_id)
    assert await kept(harness) == 1  # its message is not sent yet
    return Ended(admin, endpoint_id, consult_id)


async def test_an_admin_allows_references_for_the_practice_which_are_off_by_default(
    harness: Harness,
) -> None:
    admin = await admin_of(harness)
    shown = await (await harness.client.get("/api/admin/practice-settings")).json()
    assert shown["appointment_reference_allowed"] is False
    chosen = {"recording_allowed": True, "invite_validity_s": None}
    answer = await harness.client.put(
        "/api/admin/practice-settings",
        json={**chosen, "appointment_reference_allowed": True},
        headers=harness.headers,
    )
    assert answer.status == 200, await answer.text()
    assert (await answer.json())["appointment_reference_allowed"] is True
    # A client that does not know the field (an older console) leaves it as it is.
    kept_on = await harness.client.put(
        "/api/admin/practice-settings", json=chosen, headers=harness.headers
    )
    assert (await kept_on.json())["appointment_reference_allowed"] is True
    refused = await harness.client.put(
        "/api/admin/practice-settings",
        json={**chosen, "appointment_reference_allowed": None},
        headers=harness.headers,
    )
    assert refused.status == 422
    assert "appointment_reference_allowed" in (await refused.json())["error"]["message"]
    async with harness.app[DB_ENGINE].connect() as conn:
        saved = await practice_settings_of(conn, admin.organisation.id)
        actions = list(
            await conn.scalars(
                sa.select(access_log.c.action)
                .where(access_log.c.actor_id == admin.account_id)
                .where(access_log.c.action.startswith("practice_settings."))
                .order_by(access_log.c.id)
            )
        )
    assert saved.appointment_reference_allowed is True
    assert actions == [
        "practice_settings.read",
        "practice_settings.update",
        "practice_settings.update",
    ]


async def test_a_reference_is_refused_when_the_practice_does_not_allow_it(
    harness: Harness,
) -> None:
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(therapist)
    answer = await harness.post("/api/consults", {"appointment_reference": REFERENCE})
    assert answer.status == 422
    error = (await answer.json())["error"]
    assert error["code"] == "appointment_reference_not_allowed"
    assert "'appointment_reference'" in error["message"]
    async with harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(consults)) == 0
    assert await kept(harness) == 0


async def test_the_session_tells_the_page_whether_the_practice_allows_references(
    harness: Harness,
) -> None:
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    login = await harness.login(therapist)
    assert (await login.json())["practice"] == {"appointment_reference_allowed": False}
    await allow_references(harness)
    session = await (await harness.client.get("/api/session")).json()
    assert session["practice"] == {"appointment_reference_allowed": True}


@pytest.mark.parametrize(
    ("reference", "problem"),
    [
        ("", "1 to 64 characters"),
        ("A" * 65, "1 to 64 characters"),
        ("AFS\t42", "control characters"),
        ("AFS\u2028" + "42", "printable"),
        ("   ", "only spaces"),
    ],
)
@QUICK_ON_SQLITE
async def test_a_bad_reference_is_refused_naming_the_field(
    harness: Harness, reference: str, problem: str
) -> None:
    await allow_references(harness)
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(therapist)
    answer = await harness.post("/api/consults", {"appointment_reference": reference})
    assert answer.status == 422
    message = (await answer.json())["error"]["message"]
    assert "'appointment_reference'" in message
    assert problem in message
    assert reference.strip() == "" or reference not in message  # never echoed
    assert await kept(harness) == 0


async def test_the_reference_is_sealed_apart_and_in_no_log(
    harness: Harness,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    receiver: Receiver,
) -> None:
    caplog.set_level(logging.DEBUG)
    await allow_references(harness)
    await admin_of(harness)
    await register(harness, receiver, CONSULT_EVENTS)
    consult_id = await with_reference(harness)
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_started(conn, uuid.UUID(consult_id), now=harness.clock.now())
    async with harness.app[DB_ENGINE].connect() as conn:
        row = (await conn.execute(sa.select(appointment_references))).one()
        stored_data = list(await conn.scalars(sa.select(webhook_events.c.data)))
    assert row.consult_id == uuid.UUID(consult_id)
    assert REFERENCE.encode() not in row.wrapped_key + row.sealed_reference
    assert [set(data) for data in stored_data] == [
        {"consult_id", "scheduled_at", "started_at", "ended_at", "duration_s", "status"}
    ]  # the outbox keeps no reference: the sender adds it
    # Nowhere in plain text: no table, no byte of the SQLite file.
    assert await traces(harness, NEEDLE) == []
    assert await deliver_due(harness.app) == 1
    (started,) = receiver.of_type("consult.started")
    assert started["data"]["appointment_reference"] == REFERENCE
    captured = capfd.readouterr()
    records = [f"{record.name} {record.getMessage()} {record.args}" for record in caplog.records]
    logged = "\n".join([*records, captured.out, captured.err])
    assert "webhook delivered" in logged  # the sender's own line is there, without it
    assert REFERENCE not in logged


async def test_both_consult_events_carry_the_reference_then_it_is_destroyed(
    harness: Harness, sockets: Sockets, receiver: Receiver, fhir_receiver: Receiver
) -> None:
    await allow_references(harness)
    await admin_of(harness)
    await register(harness, receiver, CONSULT_EVENTS)
    await register(harness, fhir_receiver, CONSULT_EVENTS, payload="fhir")
    setup, therapist, _patient = await admitted_pair(
        harness, sockets, appointment_reference=REFERENCE
    )
    harness.clock.advance(15 * 60)
    await therapist.send_json({"v": 1, "type": "end"})
    await receive(therapist, "consult-ended")
    assert await kept(harness) == 1  # consult.ended is not delivered yet

    assert await deliver_due(harness.app) == 4
    assert receiver.refused == fhir_receiver.refused == []
    standard = {m["type"]: m["data"] for m in (e.message for e in receiver.received)}
    assert standard["consult.started"]["appointment_reference"] == REFERENCE
    assert standard["consult.ended"]["appointment_reference"] == REFERENCE
    assert standard["consult.ended"]["consult_id"] == setup.consult_id
    encounters = [entry.message for entry in fhir_receiver.received]
    assert [encounter["status"] for encounter in encounters] == ["in-progress", "finished"]
    for encounter in encounters:
        assert {
            "system": "urn:videoconsult:appointment-reference",
            "value": REFERENCE,
            "use": "usual",
        } in encounter["identifier"]
    # Delivered everywhere: key and ciphertext gone, and no trace of the text.
    assert await kept(harness) == 0
    assert await traces(harness, NEEDLE) == []


async def test_the_reference_waits_for_a_receiver_that_is_down(
    harness: Harness, receiver: Receiver
) -> None:
    await ended_with_message_pending(harness, receiver)
    await receiver.stop()
    assert await deliver_due(harness.app) == 1  # refused: connection failed
    assert await kept(harness) == 1
    await receiver.start()
    harness.clock.advance(30)
    assert await deliver_due(harness.app) == 1
    (ended,) = receiver.of_type("consult.ended")
    assert ended["data"]["appointment_reference"] == REFERENCE
    assert await kept(harness) == 0


async def test_the_reference_goes_when_the_message_fails_for_good(
    harness: Harness, receiver: Receiver
) -> None:
    await ended_with_message_pending(harness, receiver)
    await receiver.stop()
    assert await deliver_due(harness.app) == 1
    harness.clock.advance(25 * 3600)  # past webhooks.retry_for_s (24 h)
    assert await deliver_due(harness.app) == 1
    assert receiver.received == []
    assert await kept(harness) == 0


async def test_without_an_endpoint_for_the_consult_events_it_goes_at_the_end(
    harness: Harness,
) -> None:
    await allow_references(harness)
    consult_id = await with_reference(harness)
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_started(conn, uuid.UUID(consult_id), now=harness.clock.now())
    assert await kept(harness) == 1  # kept while the consult runs
    harness.clock.advance(60)
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_ended(conn, uuid.UUID(consult_id), now=harness.clock.now())
    assert await kept(harness) == 0
    assert await traces(harness, NEEDLE) == []


async def test_a_deleted_endpoints_pending_message_keeps_it_only_until_housekeeping(
    harness: Harness, receiver: Receiver
) -> None:
    ended = await ended_with_message_pending(harness, receiver)
    await harness.logged_in(ended.admin)
    deleted = await harness.client.delete(
        f"/api/admin/webhooks/{ended.endpoint_id}", headers=harness.headers
    )
    assert deleted.status == 204, await deleted.text()
    counts = await purge_expired(harness.app)
    assert counts["appointment_references"] == 1
    assert await kept(harness) == 0


async def test_the_reference_goes_with_the_consult_record(
    harness: Harness, receiver: Receiver
) -> None:
    await ended_with_message_pending(harness, receiver)
    # Nothing sent it, and the record's retention (a day) runs out first.
    harness.clock.advance(2 * 86400)
    async with harness.app[DB_ENGINE].begin() as conn:
        report = await purge(
            conn,
            now=harness.clock.now(),
            defaults=Retention(consult_days=1, recording_days=1, access_log_days=3650),
        )
    assert report.consults == 1
    assert await kept(harness) == 0


async def test_the_billing_export_has_the_reference_while_it_is_kept(
    harness: Harness, receiver: Receiver
) -> None:
    ended = await ended_with_message_pending(harness, receiver)
    consult_id = ended.consult_id
    async with harness.app[DB_ENGINE].begin() as conn:
        held = (
            await conn.execute(sa.select(consults).where(consults.c.id == uuid.UUID(consult_id)))
        ).one()
        # And one without a reference, of the same therapist and month.
        await create_consult(conn, therapist_id=held.therapist_id, now=held.started_at)
    await harness.logged_in(ended.admin)
    month = f"{held.started_at:%Y-%m}"
    body = await (await harness.client.get(f"/api/admin/billing?month={month}")).json()
    references = {row["consult_id"]: row["appointment_reference"] for row in body["consults"]}
    assert references.pop(consult_id) == REFERENCE
    assert list(references.values()) == [None]
    answer = await harness.client.get(f"/api/admin/billing?month={month}&format=csv")
    rows = list(csv.DictReader(io.StringIO(await answer.text())))
    assert [row["appointment_reference"] for row in rows if row["consult_id"] == consult_id] == [
        REFERENCE
    ]
    # Delivered: destroyed, and the export no longer has it.
    assert await deliver_due(harness.app) == 1
    later = await (await harness.client.get(f"/api/admin/billing?month={month}")).json()
    assert {row["appointment_reference"] for row in later["consults"]} == {None}


@pytest.mark.slow  # runs the command line in a process of its own
async def test_the_command_line_export_has_the_reference_too(
    harness: Harness, receiver: Receiver, data_dir: Path, database_url: str
) -> None:
    ended = await ended_with_message_pending(harness, receiver)
    async with harness.app[DB_ENGINE].connect() as conn:
        started_at = await conn.scalar(
            sa.select(consults.c.started_at).where(consults.c.id == uuid.UUID(ended.consult_id))
        )
    month = f"{started_at:%Y-%m}"  # the month the consult counts in
    env = cli_env(data_dir, **({"database_url": database_url} if database_url else {}))
    args = ("billing", "export", "--org", "Praktijk Noord", "--month", month, "--format", "json")
    exported = await asyncio.to_thread(run_cli, *args, env=env)
    assert exported.returncode == 0, exported.stderr
    (row,) = json.loads(exported.stdout)["consults"]
    assert (row["consult_id"], row["appointment_reference"]) == (ended.consult_id, REFERENCE)
    # The reference shown is a read of the consult: the operator's record of it.
    async with harness.app[DB_ENGINE].connect() as conn:
        records = (
            await conn.execute(
                sa.select(access_log.c.actor_role, access_log.c.action).where(
                    access_log.c.object_id == ended.consult_id
                )
            )
        ).all()
    assert ("operator", "billing.export") in [tuple(record) for record in records]
