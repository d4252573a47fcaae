"""An account's external id (issue 21, item 4): an admin sets the practice's
record-system id for a therapist, and the webhooks (Standard Webhooks' JSON
and FHIR, to real receivers that verify every signature) and the billing
export name the therapist by it; on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from audit.consults import create_consult, mark_ended, mark_started
from audit.roles import Role
from audit.schema import access_log
from audit.support import TherapistPseudonyms
from server.app_keys import DB_ENGINE, MASTER_KEY
from server.webhooks import deliver_due
from tests.support.databases import QUICK_ON_SQLITE
from tests.support.harness import Harness, Professional
from tests.support.webhooks import Receiver, running_receiver

pytestmark = pytest.mark.settings(
    webhooks_allow_http_loopback="true", webhooks_poll_interval_s="3600"
)

EXTERNAL_ID = "BIG-19012345"
CONSULT_EVENTS = ["consult.started", "consult.ended"]


@pytest.fixture
async def receiver(free_port: int) -> AsyncIterator[Receiver]:
    async with running_receiver(free_port) as found:
        yield found


async def set_external_id(harness: Harness, account_id: uuid.UUID, value: object) -> Any:
    return await put_body(harness, account_id, {"external_id": value})


async def put_body(harness: Harness, account_id: uuid.UUID, body: dict[str, object]) -> Any:
    path = f"/api/admin/accounts/{account_id}/external-id"
    return await harness.client.put(path, json=body, headers=harness.headers)


async def practice(harness: Harness) -> tuple[Professional, Professional]:
    """The practice's admin (logged in) and a therapist."""
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    return admin, therapist


async def test_an_admin_sets_and_clears_a_therapists_external_id(harness: Harness) -> None:
    admin, therapist = await practice(harness)
    answer = await set_external_id(harness, therapist.account_id, EXTERNAL_ID)
    assert answer.status == 200, await answer.text()
    assert (await answer.json())["account"]["external_id"] == EXTERNAL_ID
    shown = await harness.client.get(f"/api/admin/accounts/{therapist.account_id}")
    assert (await shown.json())["account"]["external_id"] == EXTERNAL_ID
    listed = await (await harness.client.get("/api/admin/accounts")).json()
    by_id = {entry["id"]: entry["external_id"] for entry in listed["accounts"]}
    assert by_id == {str(therapist.account_id): EXTERNAL_ID, str(admin.account_id): None}
    cleared = await set_external_id(harness, therapist.account_id, None)
    assert (await cleared.json())["account"]["external_id"] is None
    async with harness.app[DB_ENGINE].connect() as conn:
        recorded = list(
            await conn.scalars(
                sa.select(access_log.c.object_id).where(
                    access_log.c.action == "account.set-external-id",
                    access_log.c.actor_id == admin.account_id,
                )
            )
        )
    assert recorded == [str(therapist.account_id)] * 2


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"external_id": ""}, "1 to 64 characters"),
        ({"external_id": "9" * 65}, "1 to 64 characters"),
        ({"external_id": "BIG\t1"}, "control characters"),
        ({"external_id": "  "}, "only spaces"),
        ({}, "is required"),
        ({"external_id": 1234}, "string"),
    ],
)
@QUICK_ON_SQLITE
async def test_a_bad_external_id_is_refused_naming_the_field(
    harness: Harness, body: dict[str, object], problem: str
) -> None:
    _admin, therapist = await practice(harness)
    answer = await harness.client.put(
        f"/api/admin/accounts/{therapist.account_id}/external-id",
        json=body,
        headers=harness.headers,
    )
    assert answer.status == 422
    message = (await answer.json())["error"]["message"]
    assert "'external_id'" in message
    assert problem in message


async def test_an_external_id_is_one_accounts_within_a_practice(harness: Harness) -> None:
    admin, therapist = await practice(harness)
    other = await harness.professional("u@praktijk-noord.example", Role.THERAPIST)
    elsewhere = await harness.professional(
        "z@praktijk-zuid.example", Role.THERAPIST, "Praktijk Zuid"
    )
    zuid_admin = await harness.professional(
        "admin@praktijk-zuid.example", Role.ADMIN, "Praktijk Zuid"
    )
    await harness.logged_in(admin)
    assert (await set_external_id(harness, therapist.account_id, EXTERNAL_ID)).status == 200
    taken = await set_external_id(harness, other.account_id, EXTERNAL_ID)
    assert taken.status == 409
    assert "external_id" in (await taken.json())["error"]["message"]
    # Not an account of this practice: as if unknown.
    assert (await set_external_id(harness, elsewhere.account_id, "X")).status == 404
    # Another practice numbers its own people.
    await harness.logged_in(zuid_admin)
    assert (await set_external_id(harness, elsewhere.account_id, EXTERNAL_ID)).status == 200
    # Only an admin sets it.
    await harness.logged_in(therapist)
    assert (await set_external_id(harness, therapist.account_id, "Y")).status == 403


async def a_consult_of(harness: Harness, therapist: Professional) -> uuid.UUID:
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(
            conn, therapist_id=therapist.account_id, now=harness.clock.now()
        )
        await mark_started(conn, consult.id, now=harness.clock.now())
    harness.clock.advance(600)
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_ended(conn, consult.id, now=harness.clock.now(), end_reason="both_left")
    return consult.id


async def test_webhooks_name_the_therapist_by_the_external_id(
    harness: Harness, receiver: Receiver
) -> None:
    admin, therapist = await practice(harness)
    without = await harness.professional("u@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(admin)
    assert (await set_external_id(harness, therapist.account_id, EXTERNAL_ID)).status == 200
    created = await harness.post(
        "/api/admin/webhooks", {"url": receiver.url, "events": CONSULT_EVENTS}
    )
    receiver.secret = (await created.json())["secret"]
    named = await a_consult_of(harness, therapist)
    pseudonymous = await a_consult_of(harness, without)
    assert await deliver_due(harness.app) == 4
    assert receiver.refused == []
    by_consult = {
        (message["data"]["consult_id"], message["type"]): message["data"]
        for message in (entry.message for entry in receiver.received)
    }
    for kind in CONSULT_EVENTS:
        assert by_consult[(str(named), kind)]["therapist"] == EXTERNAL_ID
        assert by_consult[(str(named), kind)]["therapist_id_kind"] == "external"
        pseudonym = TherapistPseudonyms(harness.app[MASTER_KEY].key).of(without.account_id)
        assert by_consult[(str(pseudonymous), kind)]["therapist"] == pseudonym
        assert by_consult[(str(pseudonymous), kind)]["therapist_id_kind"] == "pseudonym"


async def test_a_fhir_encounter_names_the_therapist_by_the_external_id(
    harness: Harness, receiver: Receiver
) -> None:
    _admin, therapist = await practice(harness)
    assert (await set_external_id(harness, therapist.account_id, EXTERNAL_ID)).status == 200
    created = await harness.post(
        "/api/admin/webhooks",
        {"url": receiver.url, "events": ["consult.ended"], "payload": "fhir"},
    )
    receiver.secret = (await created.json())["secret"]
    await a_consult_of(harness, therapist)
    assert await deliver_due(harness.app) == 1
    (encounter,) = [entry.message for entry in receiver.received]
    assert encounter["resourceType"] == "Encounter"
    assert encounter["participant"][0]["individual"]["identifier"] == {
        "system": "urn:videoconsult:external-id",
        "value": EXTERNAL_ID,
    }


async def test_the_billing_export_has_the_external_id(harness: Harness) -> None:
    _admin, therapist = await practice(harness)
    assert (await set_external_id(harness, therapist.account_id, EXTERNAL_ID)).status == 200
    consult_id = await a_consult_of(harness, therapist)
    month = f"{harness.clock.now():%Y-%m}"
    body = await (await harness.client.get(f"/api/admin/billing?month={month}")).json()
    (row,) = body["consults"]
    assert (row["consult_id"], row["therapist_external_id"]) == (str(consult_id), EXTERNAL_ID)
    assert body["therapists"][0]["therapist_external_id"] == EXTERNAL_ID
    answer = await harness.client.get(f"/api/admin/billing?month={month}&format=csv")
    (line,) = csv.DictReader(io.StringIO(await answer.text()))
    assert line["therapist_external_id"] == EXTERNAL_ID


async def test_spaces_around_an_external_id_do_not_make_it_another(harness: Harness) -> None:
    # Found in review: the API kept " X " as given, so " X " and "X" were two
    # ids and the practice's uniqueness rule could be gone round.
    admin, therapist = await practice(harness)
    other = await harness.professional("ben@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(admin)
    first = await set_external_id(harness, therapist.account_id, "  BIG-19012345 ")
    assert first.status == 200, await first.text()
    assert (await first.json())["account"]["external_id"] == "BIG-19012345"
    taken = await set_external_id(harness, other.account_id, "BIG-19012345")
    assert taken.status == 409


async def test_two_admins_giving_two_accounts_one_id_at_once_get_one_409(
    harness: Harness,
) -> None:
    # Found in review: both checks passed on PostgreSQL, the second update hit
    # the unique index and answered 500 (its log line held the id).
    admin, therapist = await practice(harness)
    other = await harness.professional("ben@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(admin)
    answers = await asyncio.gather(
        *(
            set_external_id(harness, who, "AGB-777")
            for who in (therapist.account_id, other.account_id)
        )
    )
    assert sorted(answer.status for answer in answers) == [200, 409]
