"""Account administration, shared by the admin API and the command line.

Every change is written to the access log in the same transaction as the
change itself: no change without its record, no record without its change.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from audit.access_log import Actor, record_access
from audit.accounts import (
    Account,
    Role,
    create_account,
    disable_account,
    enable_account,
    issue_enrolment_link,
    reset_totp,
    set_role,
)
from audit.notices import NoticeKind, add_notice


@dataclass(frozen=True)
class EnrolmentInvitation:
    account: Account
    token: str
    expires_at: datetime


class AccountChange(enum.Enum):
    DISABLE = "disable"
    ENABLE = "enable"


async def add_account(
    conn: AsyncConnection,
    actor: Actor,
    *,
    organisation_id: uuid.UUID,
    email: str,
    role: Role,
    now: datetime,
    link_ttl_s: int,
) -> EnrolmentInvitation:
    """Create an account and its first enrolment link."""
    account = await create_account(
        conn, organisation_id=organisation_id, email=email, role=role, now=now
    )
    token, expires_at = await issue_enrolment_link(conn, account, now=now, ttl_s=link_ttl_s)
    await record_access(
        conn,
        actor,
        organisation_id=organisation_id,
        action="account.create",
        object_type="account",
        object_id=account.id,
        now=now,
    )
    return EnrolmentInvitation(account, token, expires_at)


async def change_account(
    conn: AsyncConnection,
    actor: Actor,
    account: Account,
    change: AccountChange,
    *,
    now: datetime,
) -> Account:
    """Disable or enable an account (disabling ends its sessions)."""
    if change is AccountChange.DISABLE:
        changed = await disable_account(conn, account, now=now)
    else:
        changed = await enable_account(conn, account)
    await record_access(
        conn,
        actor,
        organisation_id=account.organisation_id,
        action=f"account.{change.value}",
        object_type="account",
        object_id=account.id,
        now=now,
    )
    return changed


async def reset_account_totp(
    conn: AsyncConnection,
    actor: Actor,
    account: Account,
    *,
    now: datetime,
    link_ttl_s: int,
    password_too: bool = False,
) -> EnrolmentInvitation:
    """Forget the account's TOTP secret and end its sessions; return a new enrolment link.

    The account keeps its password, and the link asks for it: whoever is
    handed the link (an admin) cannot become the account; the holder finds a
    notice of the reset at their next login. ``password_too``
    forgets the password as well (the console's full reset, whose link the
    operator hands to the account holder).
    """
    reset = await reset_totp(conn, account, password_too=password_too)
    token, expires_at = await issue_enrolment_link(conn, reset, now=now, ttl_s=link_ttl_s)
    # The holder is told at their next login, whoever did it.
    await add_notice(
        conn,
        account.id,
        NoticeKind.RESET if password_too else NoticeKind.TOTP_RESET,
        by_account_id=actor.account_id,
        by_role=actor.role,
        now=now,
    )
    await record_access(
        conn,
        actor,
        organisation_id=account.organisation_id,
        action="account.reset" if password_too else "account.reset-totp",
        object_type="account",
        object_id=account.id,
        now=now,
    )
    return EnrolmentInvitation(reset, token, expires_at)


async def change_role(
    conn: AsyncConnection, actor: Actor, account: Account, role: Role, *, now: datetime
) -> Account:
    changed = await set_role(conn, account, role)
    await record_access(
        conn,
        actor,
        organisation_id=account.organisation_id,
        action="account.set-role",
        object_type="account",
        object_id=account.id,
        now=now,
    )
    return changed
