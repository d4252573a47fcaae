"""The access record of a professional's own API request: in the request's
transaction (:func:`record_in`), in one of its own (:func:`record_api_access`),
or, for a read, through the group-commit writer (:func:`record_read`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.access_log import Actor, Outcome, record_access
from audit.access_writer import MAX_BATCH
from server.app_keys import ACCESS_LOG, CLOCK, DB_ENGINE
from server.auth.sessions import Principal


async def record_in(
    conn: AsyncConnection,
    request: web.Request,
    principal: Principal,
    *,
    action: str,
    object_type: str,
    object_id: uuid.UUID | str | None,
    outcome: Outcome = Outcome.ALLOWED,
) -> None:
    """Append who (the logged-in professional) did ``action`` on which object to
    their organisation's access log, in ``conn``'s transaction: the record
    commits with the read or change it records, or neither does."""
    await record_access(
        conn,
        Actor.api(principal.account),
        organisation_id=principal.account.organisation_id,
        action=action,
        object_type=object_type,
        object_id=object_id,
        now=request.app[CLOCK].now(),
        outcome=outcome,
    )


async def record_api_access(
    request: web.Request,
    principal: Principal,
    *,
    action: str,
    object_type: str,
    object_id: uuid.UUID | None,
    outcome: Outcome = Outcome.ALLOWED,
) -> None:
    """Append who (the logged-in professional) did ``action`` on which object, and
    how it ended, to their organisation's access log; committed at once."""
    async with request.app[DB_ENGINE].begin() as conn:
        await record_in(
            conn,
            request,
            principal,
            action=action,
            object_type=object_type,
            object_id=object_id,
            outcome=outcome,
        )


async def record_read(
    request: web.Request,
    principal: Principal,
    *,
    action: str,
    object_type: str,
    object_id: uuid.UUID | str | None,
    outcome: Outcome = Outcome.ALLOWED,
) -> None:
    """Record the professional's read through the access-log writer (group
    commit); return once it is committed. Call it before answering the read:
    :class:`audit.errors.AccessLogNotWritten` means the read is not answered."""
    await request.app[ACCESS_LOG].record(
        Actor.api(principal.account),
        organisation_id=principal.account.organisation_id,
        action=action,
        object_type=object_type,
        object_id=object_id,
        now=request.app[CLOCK].now(),
        outcome=outcome,
    )


async def record_reads_of(
    request: web.Request,
    principal: Principal,
    *,
    action: str,
    object_type: str,
    object_ids: Iterable[uuid.UUID],
) -> None:
    """Record a read of each object a list or an export showed personal data
    of (a consult's label, its appointment reference), through the writer:
    each object's own record, so that a patient's receipt lists it. Returns
    once all are committed; a writer's batch at a time, so that a long
    export's records neither hold the loop nor queue all at once."""
    writer, now = request.app[ACCESS_LOG], request.app[CLOCK].now()
    actor = Actor.api(principal.account)
    ids = list(object_ids)
    for start in range(0, len(ids), MAX_BATCH):
        await asyncio.gather(
            *(
                writer.record(
                    actor,
                    organisation_id=principal.account.organisation_id,
                    action=action,
                    object_type=object_type,
                    object_id=object_id,
                    now=now,
                )
                for object_id in ids[start : start + MAX_BATCH]
            )
        )
