"""What a practice (an organisation) sets for itself, within the server's settings.

The installation's settings are the outer bounds; a practice can only
narrow them: its therapists may record only when the server records at all
(``recording.enabled``) and the practice allows it, and its invite links
live at most as long as the server's ``consults.invite_validity_s`` (the
server's housekeeping and the rooms' state in Redis are sized by that).
Without a row of its own a practice has the server's settings.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.db import save_organisation_row
from audit.schema import accounts, consults, practice_settings

# The shortest invite validity a practice may choose: an hour.
MIN_INVITE_VALIDITY_S = 3600


@dataclass(frozen=True)
class PracticeSettings:
    # The practice lets its therapists ask to record (with the patient's consent).
    recording_allowed: bool
    # How long an invite link works; None: the server's validity.
    invite_validity_s: int | None
    # Its therapists may attach the practice's appointment reference to a
    # consult (sealed, sent in its webhooks; audit/references.py).
    appointment_reference_allowed: bool = False

    def invite_validity(self, server_validity_s: int) -> int:
        """The validity in force: the practice's own, never past the server's."""
        if self.invite_validity_s is None:
            return server_validity_s
        return min(self.invite_validity_s, server_validity_s)


SERVER_DEFAULTS = PracticeSettings(
    recording_allowed=True, invite_validity_s=None, appointment_reference_allowed=False
)


async def practice_settings_of(
    conn: AsyncConnection, organisation_id: uuid.UUID
) -> PracticeSettings:
    row = (
        await conn.execute(
            sa.select(practice_settings).where(
                practice_settings.c.organisation_id == organisation_id
            )
        )
    ).first()
    if row is None:
        return SERVER_DEFAULTS
    return PracticeSettings(
        row.recording_allowed, row.invite_validity_s, row.appointment_reference_allowed
    )


async def set_practice_settings(
    conn: AsyncConnection, organisation_id: uuid.UUID, chosen: PracticeSettings, *, now: datetime
) -> None:
    values = {
        "recording_allowed": chosen.recording_allowed,
        "invite_validity_s": chosen.invite_validity_s,
        "appointment_reference_allowed": chosen.appointment_reference_allowed,
        "updated_at": now,
    }
    await save_organisation_row(conn, practice_settings, organisation_id, values)


async def recording_allowed_for_consult(conn: AsyncConnection, consult_id: uuid.UUID) -> bool:
    """Whether the practice of the consult's therapist lets it be recorded."""
    allowed = await conn.scalar(
        sa.select(practice_settings.c.recording_allowed)
        .select_from(
            consults.join(accounts, accounts.c.id == consults.c.therapist_id).join(
                practice_settings,
                practice_settings.c.organisation_id == accounts.c.organisation_id,
            )
        )
        .where(consults.c.id == consult_id)
    )
    return SERVER_DEFAULTS.recording_allowed if allowed is None else bool(allowed)
