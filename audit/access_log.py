"""The access log: who looked at or changed what, when, and with what outcome.

One record per read of personal data and per administrative change, with
the fields NEN 7513 asks for. Records are only ever appended. (The audit
issue adds the hash chain and its verification on top of this table.)
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.schema import access_log


class Outcome(enum.Enum):
    ALLOWED = "allowed"
    REFUSED = "refused"


class ClientType(enum.Enum):
    # The JSON API (a browser page or another HTTP client).
    API = "api"
    # The videoconsult command line, run by the operator.
    CLI = "cli"
    # The signaling WebSocket.
    WEBSOCKET = "websocket"


# The actor role of changes made at the command line.
OPERATOR = "operator"


@dataclass(frozen=True)
class AccessRecord:
    at: datetime
    organisation_id: uuid.UUID | None
    # None for the command line run by the operator, or an unauthenticated caller.
    actor_id: uuid.UUID | None
    actor_role: str
    # A dotted verb, e.g. "account.disable".
    action: str
    object_type: str
    # A pseudonymous id (a UUID), never a name or an address.
    object_id: str | None
    outcome: Outcome
    client_type: ClientType


async def append_access(conn: AsyncConnection, record: AccessRecord) -> None:
    """Append one record. There is no update or delete counterpart, on purpose."""
    await conn.execute(
        access_log.insert().values(
            at=record.at,
            organisation_id=record.organisation_id,
            actor_id=record.actor_id,
            actor_role=record.actor_role,
            action=record.action,
            object_type=record.object_type,
            object_id=record.object_id,
            outcome=record.outcome.value,
            client_type=record.client_type.value,
        )
    )


async def read_access_log(
    conn: AsyncConnection, organisation_id: uuid.UUID, *, limit: int = 100
) -> list[AccessRecord]:
    """Return an organisation's newest records first."""
    rows = await conn.execute(
        sa.select(access_log)
        .where(access_log.c.organisation_id == organisation_id)
        .order_by(access_log.c.id.desc())
        .limit(limit)
    )
    return [
        AccessRecord(
            at=row.at,
            organisation_id=row.organisation_id,
            actor_id=row.actor_id,
            actor_role=row.actor_role,
            action=row.action,
            object_type=row.object_type,
            object_id=row.object_id,
            outcome=Outcome(row.outcome),
            client_type=ClientType(row.client_type),
        )
        for row in rows
    ]
