"""Access-log records for tests that need many of them."""

from __future__ import annotations

import uuid
from datetime import datetime

from audit.access_log import AccessRecord, ClientType, Outcome


def consult_read(
    n: int, at: datetime, organisation_id: uuid.UUID, therapist_id: uuid.UUID | None
) -> AccessRecord:
    """A therapist's read of consult ``n`` through the API, ``at``."""
    return AccessRecord(
        at=at,
        organisation_id=organisation_id,
        actor_id=therapist_id,
        actor_role="therapist",
        action="consult.read",
        object_type="consult",
        object_id=str(uuid.UUID(int=n)),
        outcome=Outcome.ALLOWED,
        client_type=ClientType.API,
    )
