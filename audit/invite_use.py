"""Opening a patient's invite link: whether it can be used now, and the
note of its first use.

Every ticket request and every socket's door opens the invite (issue 19's
admission storm): the statements are compiled once and, on PostgreSQL, run
on asyncpg's own connections, those of many patients at once batched into
one (:mod:`audit.direct`). The values go in as parameters.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from audit.consults import OVER_STATUSES, Invite, InviteInvalid, InviteProblem, consult_of
from audit.direct import AllAtOnce, ByKey, Prepared, Statements
from audit.schema import consults, invites
from audit.sealing import token_hash

__all__ = ["note_invite_used", "open_invite", "open_invite_by_hash"]


def _invite_with_consult(where: sa.ColumnElement[bool]) -> sa.Select[Any]:
    # The invite and its consult in one query (one round trip).
    return (
        sa.select(
            invites.c.token_hash,
            invites.c.expires_at,
            invites.c.revoked_at,
            invites.c.guardian_consent,
            consults,
        )
        .select_from(invites)
        .join(consults, consults.c.id == invites.c.consult_id)
        .where(where)
    )


_INVITE_WITH_CONSULT = Prepared(
    _invite_with_consult(invites.c.token_hash == sa.bindparam("invite_hash")),
    # Many tickets asked for (or sockets opened) at once: one statement.
    batch=ByKey(
        _invite_with_consult(
            invites.c.token_hash
            == sa.any_(sa.bindparam("invite_hashes", type_=ARRAY(invites.c.token_hash.type)))
        ),
        key_param="invite_hash",
        keys_param="invite_hashes",
        key_column="token_hash",
    ),
)
_CONSULT_STATUS = Prepared(
    sa.select(consults.c.status).where(consults.c.id == sa.bindparam("consult_id"))
)
_NOTE_INVITE_USED = Prepared(
    invites.update()
    .where(
        invites.c.token_hash == sa.bindparam("invite_hash"),
        invites.c.first_used_at.is_(None),
    )
    .values(first_used_at=sa.bindparam("used_at", type_=invites.c.first_used_at.type)),
    batch=AllAtOnce(),
)


async def open_invite(db: Statements, token: str, *, now: datetime) -> Invite:
    """Return the invite if it can be used now; :class:`InviteInvalid` says why not.

    Usable: not revoked, its consult not over, and either within its validity
    or its consult running (the patient was admitted).
    """
    return await open_invite_by_hash(db, token_hash(token), now=now)


async def open_invite_by_hash(
    db: Statements,
    invite_hash: str,
    *,
    now: datetime,
    consult_id: uuid.UUID | None = None,
) -> Invite:
    """Like :func:`open_invite`, by the stored hash (checked again on every reconnect).

    ``consult_id`` is the consult the invite was for, when the caller knows
    it (a ticket made from it): the invite of a consult that is over is gone
    (:func:`mark_ended` deletes it), and then it still answers that the
    consult is over. It only reads.
    """
    row = await db.first(_INVITE_WITH_CONSULT, {"invite_hash": invite_hash})
    if row is None:
        status = None
        if consult_id is not None:
            found = await db.first(_CONSULT_STATUS, {"consult_id": consult_id})
            status = None if found is None else found["status"]
        over = status in OVER_STATUSES
        raise InviteInvalid(InviteProblem.CONSULT_OVER if over else InviteProblem.UNKNOWN)
    if row["revoked_at"] is not None:
        raise InviteInvalid(InviteProblem.REVOKED)
    consult = consult_of(row)
    if consult.is_over:
        raise InviteInvalid(InviteProblem.CONSULT_OVER)
    # The link's validity bounds the wait for the consult, not the consult:
    # once admitted (the consult runs), the patient may come back after a
    # drop or a reload until it ends, or until the therapist revokes the link.
    if row["expires_at"] <= now and consult.started_at is None:
        raise InviteInvalid(InviteProblem.EXPIRED)
    return Invite(
        row["token_hash"],
        consult.id,
        row["expires_at"],
        row["guardian_consent"],
        scheduled_at=consult.scheduled_at,
        consult_started=consult.started_at is not None,
    )


async def note_invite_used(db: Statements, invite: Invite, *, now: datetime) -> None:
    await db.execute(_NOTE_INVITE_USED, {"invite_hash": invite.token_hash, "used_at": now})
