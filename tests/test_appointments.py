"""Appointments: the scheduled time on the consult, the waiting room that opens
before it, and the therapist's label, sealed apart and destroyed at the end."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from audit.clock import ManualClock
from audit.practice import PracticeSettings, set_practice_settings
from audit.roles import Role
from audit.schema import consult_labels, consults
from server import create_app
from server.app_keys import DB_ENGINE, SETTINGS
from server.housekeeping import purge_expired
from server.resources import ROOM_TIMER_POLL
from tests.support.harness import Harness, new_consult
from tests.support.traces import traces

LABEL = "Mevr. Zwaluwstaart, knie"


def later(harness: Harness, *, hours: float) -> datetime:
    return harness.clock.now() + timedelta(hours=hours)


async def sealed_row(harness: Harness, consult_id: str) -> Any:
    async with harness.app[DB_ENGINE].connect() as conn:
        return (
            await conn.execute(
                sa.select(consult_labels).where(
                    consult_labels.c.consult_id == uuid.UUID(consult_id)
                )
            )
        ).one_or_none()


async def test_the_appointment_is_stored_on_the_consult_and_shown(harness: Harness) -> None:
    scheduled = later(harness, hours=26).isoformat()
    setup = await new_consult(harness, scheduled_at=scheduled)
    async with harness.app[DB_ENGINE].connect() as conn:
        stored = await conn.scalar(
            sa.select(consults.c.scheduled_at).where(consults.c.id == uuid.UUID(setup.consult_id))
        )
    assert stored is not None
    assert stored.isoformat() == scheduled
    shown = await (await harness.client.get(f"/api/consults/{setup.consult_id}")).json()
    assert shown["consult"]["scheduled_at"] == scheduled
    # A reissued link of a consult booked for tomorrow is still good after it.
    reissued = await (await harness.post(f"/api/consults/{setup.consult_id}/invite")).json()
    expires = datetime.fromisoformat(scheduled) + timedelta(hours=24)
    assert reissued["invite_expires_at"] == expires.isoformat()


async def test_the_label_is_sealed_in_a_table_of_its_own(harness: Harness) -> None:
    setup = await new_consult(harness, display_name=LABEL)
    row = await sealed_row(harness, setup.consult_id)
    assert row is not None
    assert LABEL.encode() not in row.sealed_label
    assert row.wrapped_key != row.sealed_label
    assert await traces(harness, {"label": LABEL.encode(), "label part": b"Zwaluwstaart"}) == []
    listing = await (await harness.client.get("/api/consults")).json()
    assert [consult["display_name"] for consult in listing["consults"]] == [LABEL]


async def test_the_label_survives_a_restart(
    harness: Harness, clock: ManualClock, aiohttp_client: Any
) -> None:
    setup = await new_consult(harness, display_name=LABEL)
    # Another server on the same database and data directory (its master key):
    # nothing of the first one's memory.
    app = create_app(harness.app[SETTINGS], clock=clock)
    app[ROOM_TIMER_POLL] = 3600.0
    restarted = Harness(app, await aiohttp_client(app), clock)
    await restarted.logged_in(setup.therapist)
    shown = await (await restarted.client.get(f"/api/consults/{setup.consult_id}")).json()
    assert shown["consult"]["display_name"] == LABEL


async def test_the_label_is_gone_key_and_ciphertext_once_the_consult_ends(
    harness: Harness,
) -> None:
    setup = await new_consult(harness, display_name=LABEL)
    row = await sealed_row(harness, setup.consult_id)
    needles = {
        "label": LABEL.encode(),
        "ciphertext": row.sealed_label,
        "wrapped key": row.wrapped_key,
    }
    ended = await harness.post(f"/api/consults/{setup.consult_id}/end")
    assert ended.status == 200
    assert (await ended.json())["consult"]["display_name"] is None
    assert await sealed_row(harness, setup.consult_id) is None
    assert await traces(harness, needles) == []


async def test_the_label_is_destroyed_when_its_link_runs_out_unused(harness: Harness) -> None:
    setup = await new_consult(harness, display_name=LABEL)
    row = await sealed_row(harness, setup.consult_id)
    needles = {"ciphertext": row.sealed_label, "wrapped key": row.wrapped_key}
    harness.clock.advance(harness.app[SETTINGS].consults.invite_validity_s + 1)
    counts = await purge_expired(harness.app)
    assert counts["abandoned_consults"] == 1
    assert await sealed_row(harness, setup.consult_id) is None
    assert await traces(harness, needles) == []


async def test_the_label_goes_when_a_practices_shorter_link_runs_out_unused(
    harness: Harness,
) -> None:
    """Found in review: housekeeping ended unused consults by the server's
    validity (24 h), so a practice's 1-hour link left its label 23 hours too long."""
    organisation = await harness.organisation()
    async with harness.app[DB_ENGINE].begin() as conn:
        await set_practice_settings(
            conn,
            organisation.id,
            PracticeSettings(recording_allowed=True, invite_validity_s=3600),
            now=harness.clock.now(),
        )
    setup = await new_consult(harness, display_name=LABEL)
    harness.clock.advance(1800)
    await purge_expired(harness.app)
    assert await sealed_row(harness, setup.consult_id) is not None  # the link still works
    harness.clock.advance(1801)
    await purge_expired(harness.app)
    assert await sealed_row(harness, setup.consult_id) is None


async def test_a_patient_who_comes_early_is_told_when_the_waiting_room_opens(
    harness: Harness,
) -> None:
    scheduled = later(harness, hours=2)
    setup = await new_consult(harness, scheduled_at=scheduled.isoformat())
    opens = (scheduled - timedelta(minutes=15)).isoformat()  # the default
    status = await (await harness.client.get(f"/api/invites/{setup.invite_token}")).json()
    assert status["opens_at"] == opens
    ticket = await harness.post(f"/api/invites/{setup.invite_token}/ticket", {"consent": True})
    assert ticket.status == 409
    error = (await ticket.json())["error"]
    assert error["code"] == "waiting_room_not_open"
    assert opens in error["message"]
    harness.clock.advance((scheduled - timedelta(minutes=15) - harness.clock.now()).total_seconds())
    status = await (await harness.client.get(f"/api/invites/{setup.invite_token}")).json()
    assert status["opens_at"] is None
    ticket = await harness.post(f"/api/invites/{setup.invite_token}/ticket", {"consent": True})
    assert ticket.status == 200


@pytest.mark.settings(consults_waiting_room_opens_before_s=3600)
async def test_how_early_the_waiting_room_opens_is_a_setting(harness: Harness) -> None:
    scheduled = later(harness, hours=2)
    setup = await new_consult(harness, scheduled_at=scheduled.isoformat())
    status = await (await harness.client.get(f"/api/invites/{setup.invite_token}")).json()
    assert status["opens_at"] == (scheduled - timedelta(hours=1)).isoformat()


async def test_a_consult_without_an_appointment_opens_at_once(harness: Harness) -> None:
    setup = await new_consult(harness)
    status = await (await harness.client.get(f"/api/invites/{setup.invite_token}")).json()
    assert status["opens_at"] is None
    ticket = await harness.post(f"/api/invites/{setup.invite_token}/ticket", {"consent": True})
    assert ticket.status == 200


async def test_sqlite_overwrites_what_it_deletes(sqlite_harness: Harness) -> None:
    # A destroyed label's key must not linger in the file's free pages; some
    # SQLite builds do not overwrite deleted rows unless told to.
    async with sqlite_harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.text("PRAGMA secure_delete")) == 1


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
async def test_an_appointment_that_does_not_exist_in_utc_is_refused_naming_the_field(
    harness: Harness, moment: str
) -> None:
    """Found by the API fuzzing: a 500 from storing a time before the year 1 in UTC."""
    therapist = await harness.professional("t@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(therapist)
    answer = await harness.post("/api/consults", {"scheduled_at": moment})
    assert answer.status == 422
    assert (await answer.json())["error"]["message"].startswith("field 'scheduled_at'")
