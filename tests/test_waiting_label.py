"""The therapist's label in the waiting room: unsealed from its row in the
database when the therapist is told that a patient waits, never kept in a
room's state (in memory, or in Redis until the invite runs out), and gone with
the consult (DESIGN.md, promise 11)."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from audit.access_log import ClientType
from audit.errors import AccessLogNotWritten
from audit.schema import access_log, accounts, consults
from server.app_keys import ACCESS_LOG, DB_ENGINE, ROOMS
from signaling.waiting_label import RECORD_WAIT_S
from tests.support.harness import Harness, Sockets, new_consult, receive
from tests.support.traces import redis_traces, traces

LABEL_READ = "consult.label.read"

# Each test runs on the in-process rooms (SQLite, PostgreSQL) and on Redis.
pytestmark = pytest.mark.signaling_backends


def a_label() -> str:
    """A label no other test's Redis keys can hold (they share the server)."""
    return f"Mevr. Kwikstaart {secrets.token_hex(4)}, enkel"


async def room_traces(harness: Harness, consult_id: str, label: str) -> list[str]:
    """Where the label is in the rooms' keeping: the room's state, and any Redis key."""
    found = await redis_traces(harness, {"label": label.encode()})
    state = await harness.app[ROOMS].room_state(uuid.UUID(consult_id))
    if label in repr(state):
        found.append("label in the room's state")
    return found


async def label_reads(harness: Harness, consult_id: str) -> list[sa.Row[Any]]:
    """The access records of the label shown for this consult (DESIGN.md,
    promise 6: every read of a consult's data is logged)."""
    async with harness.app[DB_ENGINE].connect() as conn:
        therapist, organisation = (
            await conn.execute(
                sa.select(consults.c.therapist_id, accounts.c.organisation_id)
                .join(accounts, accounts.c.id == consults.c.therapist_id)
                .where(consults.c.id == uuid.UUID(consult_id))
            )
        ).one()
        rows = list(
            await conn.execute(
                sa.select(access_log).where(
                    access_log.c.object_id == consult_id,
                    access_log.c.action == LABEL_READ,
                )
            )
        )
    for row in rows:
        assert (row.actor_id, row.actor_role) == (therapist, "therapist")
        assert row.organisation_id == organisation  # the therapist's organisation's chain
        assert (row.client_type, row.object_type, row.outcome) == (
            ClientType.WEBSOCKET.value,
            "consult",
            "allowed",
        )
    return rows


async def patient_comes(sockets: Sockets, setup: Any) -> dict[str, Any]:
    """The therapist is there, the patient comes: the therapist's patient-waiting."""
    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    patient = await sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    message: dict[str, Any] = await receive(therapist, "patient-waiting")
    return message


async def test_the_label_never_enters_the_room_or_redis_and_the_therapist_still_gets_it(
    harness: Harness, sockets: Sockets
) -> None:
    label = a_label()
    setup = await new_consult(harness, display_name=label)
    assert await room_traces(harness, setup.consult_id, label) == []

    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    patient = await sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    assert (await receive(therapist, "patient-waiting"))["display_name"] == label
    assert len(await label_reads(harness, setup.consult_id)) == 1
    assert await room_traces(harness, setup.consult_id, label) == []

    # A revoke sends the waiting patient away; the label is still nowhere.
    revoked = await harness.client.delete(
        f"/api/consults/{setup.consult_id}/invite", headers=harness.headers
    )
    assert revoked.status == 204
    await receive(therapist, "peer-left")
    assert await room_traces(harness, setup.consult_id, label) == []

    ended = await harness.post(f"/api/consults/{setup.consult_id}/end")
    assert ended.status == 200
    assert await room_traces(harness, setup.consult_id, label) == []
    assert await traces(harness, {"label": label.encode()}) == []


async def test_a_revoked_link_leaves_no_label_in_the_room_or_redis(harness: Harness) -> None:
    label = a_label()
    setup = await new_consult(harness, display_name=label)
    revoked = await harness.client.delete(
        f"/api/consults/{setup.consult_id}/invite", headers=harness.headers
    )
    assert revoked.status == 204
    assert await room_traces(harness, setup.consult_id, label) == []


async def test_a_therapist_who_comes_after_the_patient_is_told_the_label(
    harness: Harness, sockets: Sockets
) -> None:
    label = a_label()
    setup = await new_consult(harness, display_name=label)
    patient = await sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    therapist = await sockets.therapist(setup.consult_id)
    assert (await receive(therapist, "welcome"))["peer_present"] is True
    assert (await receive(therapist, "patient-waiting"))["display_name"] == label
    assert len(await label_reads(harness, setup.consult_id)) == 1


async def test_a_room_that_lost_its_state_still_tells_the_label(
    harness: Harness, sockets: Sockets
) -> None:
    """The room's state gone (Redis lost its data): the repair round puts the
    two back, and the therapist hears of the waiting patient with the label,
    which was never in the state that was lost."""
    label = a_label()
    setup = await new_consult(harness, display_name=label)
    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    patient = await sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    await receive(therapist, "patient-waiting")

    rooms = harness.app[ROOMS]
    await rooms._store.forget(uuid.UUID(setup.consult_id))
    assert await rooms.reconcile() == 2
    assert (await receive(therapist, "patient-waiting"))["display_name"] == label
    # Shown twice, recorded twice.
    assert len(await label_reads(harness, setup.consult_id)) == 2
    assert await room_traces(harness, setup.consult_id, label) == []


async def test_a_consult_without_a_label_tells_none(harness: Harness, sockets: Sockets) -> None:
    setup = await new_consult(harness)
    assert (await patient_comes(sockets, setup))["display_name"] is None
    assert await label_reads(harness, setup.consult_id) == []


async def test_a_label_whose_read_cannot_be_recorded_is_not_shown(
    harness: Harness, sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No read without its record: when the access log cannot be written the
    therapist still hears that the patient waits, without the label. (The
    writer's failure is simulated: a database that fails just that commit
    cannot be arranged from outside.)"""

    async def fails(*_args: Any, **_kwargs: Any) -> None:
        raise AccessLogNotWritten("the batch did not commit")

    monkeypatch.setattr(harness.app[ACCESS_LOG], "record", fails)
    setup = await new_consult(harness, display_name=a_label())
    assert (await patient_comes(sockets, setup))["display_name"] is None
    assert await label_reads(harness, setup.consult_id) == []


async def test_a_consult_whose_therapist_was_erased_shows_and_records_no_label(
    harness: Harness, sockets: Sockets
) -> None:
    """Erasure leaves the consult without a therapist while an open socket
    lives on until its session check: there is nobody to record the read
    as, so the label is not shown."""
    setup = await new_consult(harness, display_name=a_label())
    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    async with harness.app[DB_ENGINE].begin() as conn:
        await conn.execute(
            consults.update()
            .where(consults.c.id == uuid.UUID(setup.consult_id))
            .values(therapist_id=None)
        )
    patient = await sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    assert (await receive(therapist, "patient-waiting"))["display_name"] is None
    async with harness.app[DB_ENGINE].connect() as conn:
        recorded = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(access_log)
            .where(access_log.c.action == LABEL_READ)
        )
    assert recorded == 0


async def test_a_slow_access_record_holds_the_room_for_record_wait_s_at_most(
    harness: Harness, sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The label's record is awaited inside the room's change (the
    therapist's messages keep their order), but never longer than
    RECORD_WAIT_S: when it takes longer (a chain held by a purge; the delay
    is simulated, as a held chain cannot be arranged from outside) the
    therapist hears of the patient without the label, and the room goes on."""
    real_record = harness.app[ACCESS_LOG].record

    async def slow(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(RECORD_WAIT_S + 5)
        await real_record(*args, **kwargs)

    monkeypatch.setattr(harness.app[ACCESS_LOG], "record", slow)
    setup = await new_consult(harness, display_name=a_label())
    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    began = time.monotonic()
    patient = await sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    assert (await receive(therapist, "patient-waiting"))["display_name"] is None
    assert time.monotonic() - began < RECORD_WAIT_S + 2
    # The room was let go: the therapist's admit goes through at once.
    await therapist.send_json({"v": 1, "type": "admit"})
    await receive(patient, "admitted")
    assert time.monotonic() - began < RECORD_WAIT_S + 3
