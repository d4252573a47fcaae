"""What an account holder must be told at their next login.

Today: that an admin or the operator reset their credentials. The notice
stays until its holder dismisses it; who did it is kept as an account id
(resolved to an address when shown), so erasing that account forgets it.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.schema import account_notices, accounts


class NoticeKind(enum.Enum):
    TOTP_RESET = "totp-reset"  # the authenticator app; the password stayed
    RESET = "reset"  # password and authenticator app


@dataclass(frozen=True)
class Notice:
    id: int
    kind: NoticeKind
    at: datetime
    by_role: str
    # The address of the account that did it; None for the operator, or
    # once that account is gone.
    by_email: str | None


async def add_notice(
    conn: AsyncConnection,
    account_id: uuid.UUID,
    kind: NoticeKind,
    *,
    by_account_id: uuid.UUID | None,
    by_role: str,
    now: datetime,
) -> None:
    await conn.execute(
        account_notices.insert().values(
            account_id=account_id,
            kind=kind.value,
            created_at=now,
            by_account_id=by_account_id,
            by_role=by_role,
        )
    )


async def pending_notices(conn: AsyncConnection, account_id: uuid.UUID) -> list[Notice]:
    """The account's notices not dismissed yet, oldest first."""
    by = accounts.alias("by")
    rows = await conn.execute(
        sa.select(account_notices, by.c.email.label("by_email"))
        .select_from(account_notices.outerjoin(by, by.c.id == account_notices.c.by_account_id))
        .where(account_notices.c.account_id == account_id)
        .order_by(account_notices.c.id)
    )
    return [
        Notice(row.id, NoticeKind(row.kind), row.created_at, row.by_role, row.by_email)
        for row in rows
    ]


async def dismiss_notice(conn: AsyncConnection, account_id: uuid.UUID, notice_id: int) -> bool:
    """Delete the account's notice; False if it has none by that id."""
    result = await conn.execute(
        account_notices.delete().where(
            account_notices.c.id == notice_id, account_notices.c.account_id == account_id
        )
    )
    return result.rowcount == 1
