"""Organisations, professional accounts and their enrolment links, at rest.

Query functions take an open connection (the caller owns the transaction)
and raise :mod:`audit.errors`: :class:`NotFound` (also for records of another
organisation), :class:`Conflict`, :class:`InvalidValue`.
"""

from __future__ import annotations

import enum
import secrets
import unicodedata
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import sqlalchemy as sa
from email_validator import EmailNotValidError, validate_email
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.errors import Conflict, InvalidValue, NotFound
from audit.roles import ROLE_NAMES
from audit.roles import Role as Role  # re-exported: callers think of roles with accounts
from audit.schema import access_log, accounts, enrolment_links, organisations, sessions
from audit.sealing import token_hash

MAX_EMAIL_LENGTH = 254


class AccountStatus(enum.Enum):
    # Created; password and TOTP not set (or TOTP reset). Cannot log in.
    ENROLLING = "enrolling"
    # Enrolled and allowed to log in.
    ACTIVE = "active"
    # Switched off by an admin. Cannot log in; has no sessions.
    DISABLED = "disabled"


@dataclass(frozen=True)
class Organisation:
    id: uuid.UUID
    name: str
    created_at: datetime


@dataclass(frozen=True)
class Account:
    id: uuid.UUID
    organisation_id: uuid.UUID
    email: str
    role: Role
    created_at: datetime
    enrolled_at: datetime | None
    disabled_at: datetime | None
    # Secrets stay out of repr, so an account can never print them.
    password_hash: str | None = field(repr=False)
    totp_secret_sealed: bytes | None = field(repr=False)
    totp_last_step: int | None = field(repr=False)
    # The practice's record system's id for the person (webhooks name the
    # therapist by it), set by an admin.
    external_id: str | None = None

    @property
    def status(self) -> AccountStatus:
        if self.disabled_at is not None:
            return AccountStatus.DISABLED
        if self.enrolled_at is None:
            return AccountStatus.ENROLLING
        return AccountStatus.ACTIVE


@dataclass(frozen=True)
class EnrolmentLink:
    token_hash: str
    account: Account
    expires_at: datetime
    pending_password_hash: str | None = field(repr=False)
    pending_totp_secret_sealed: bytes | None = field(repr=False)


def normalise_email(raw: str) -> str:
    """Return the stored form of an e-mail address: ASCII, lower case.

    Raises :class:`InvalidValue` naming the problem. Non-ASCII characters are
    refused outright: look-alike letters and invisible characters would let
    two different accounts read the same to a person.
    """
    email = raw.strip()
    if not email:
        raise InvalidValue("the e-mail address is empty")
    if len(email) > MAX_EMAIL_LENGTH:
        raise InvalidValue(f"the e-mail address is longer than {MAX_EMAIL_LENGTH} characters")
    for char in email:
        if not char.isascii() or not char.isprintable():
            raise InvalidValue(
                f"the e-mail address may contain only plain ASCII characters, not U+{ord(char):04X}"
            )
    try:
        checked = validate_email(email, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as err:
        raise InvalidValue(f"the e-mail address is not valid: {err}") from None
    return checked.normalized.lower()


def parse_role(raw: str) -> Role:
    """Return the role named ``raw``; raise :class:`InvalidValue` otherwise."""
    try:
        return Role(raw)
    except ValueError:
        allowed = ", ".join(ROLE_NAMES)
        raise InvalidValue(f"unknown role {raw!r}; allowed: {allowed}") from None


# --- organisations ----------------------------------------------------------


async def create_organisation(conn: AsyncConnection, name: str, *, now: datetime) -> Organisation:
    """Add an organisation; raise :class:`Conflict` if the name is taken."""
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise InvalidValue("an organisation name needs 1 to 200 characters")
    for char in name:
        # As the API refuses them in any text: they garble every list that shows it.
        if unicodedata.category(char) == "Cc":
            raise InvalidValue(
                f"an organisation name must not contain control characters (U+{ord(char):04X})"
            )
    if await conn.scalar(sa.select(organisations.c.id).where(organisations.c.name == name)):
        raise Conflict(f"an organisation named {name!r} exists already")
    organisation = Organisation(uuid.uuid4(), name, now)
    await conn.execute(organisations.insert().values(id=organisation.id, name=name, created_at=now))
    return organisation


async def get_organisation_by_name(conn: AsyncConnection, name: str) -> Organisation:
    row = (
        await conn.execute(sa.select(organisations).where(organisations.c.name == name.strip()))
    ).first()
    if row is None:
        raise NotFound(f"no organisation named {name.strip()!r}")
    return Organisation(row.id, row.name, row.created_at)


async def list_organisations(conn: AsyncConnection) -> list[Organisation]:
    rows = await conn.execute(sa.select(organisations).order_by(organisations.c.name))
    return [Organisation(row.id, row.name, row.created_at) for row in rows]


# --- accounts ----------------------------------------------------------------


def _account(row: sa.Row[tuple[object, ...]]) -> Account:
    mapping = row._mapping
    return Account(
        id=mapping["id"],
        organisation_id=mapping["organisation_id"],
        email=mapping["email"],
        role=Role(mapping["role"]),
        created_at=mapping["created_at"],
        enrolled_at=mapping["enrolled_at"],
        disabled_at=mapping["disabled_at"],
        password_hash=mapping["password_hash"],
        totp_secret_sealed=mapping["totp_secret_sealed"],
        totp_last_step=mapping["totp_last_step"],
        external_id=mapping["external_id"],
    )


async def set_external_id(
    conn: AsyncConnection, account: Account, external_id: str | None
) -> Account:
    """Set (or with None clear) the account's external id; :class:`Conflict`
    when another account of its organisation has it."""
    if external_id is not None:
        taken = await conn.scalar(
            sa.select(accounts.c.id).where(
                accounts.c.organisation_id == account.organisation_id,
                accounts.c.external_id == external_id,
                accounts.c.id != account.id,
            )
        )
        if taken is not None:
            raise Conflict("field 'external_id': another account of the practice has it")
    try:
        # In a savepoint: another admin giving another account the same id at
        # the same moment passes the check too, and meets the unique index.
        async with conn.begin_nested():
            await conn.execute(
                accounts.update().where(accounts.c.id == account.id).values(external_id=external_id)
            )
    except sa.exc.IntegrityError:
        raise Conflict("field 'external_id': another account of the practice has it") from None
    return replace(account, external_id=external_id)


async def external_ids(
    conn: AsyncConnection, account_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, str]:
    """The external ids of those of these accounts that have one."""
    wanted = list(set(account_ids))
    if not wanted:
        return {}
    rows = await conn.execute(
        sa.select(accounts.c.id, accounts.c.external_id).where(
            accounts.c.id.in_(wanted), accounts.c.external_id.is_not(None)
        )
    )
    return {row.id: row.external_id for row in rows}


async def create_account(
    conn: AsyncConnection,
    *,
    organisation_id: uuid.UUID,
    email: str,
    role: Role,
    now: datetime,
) -> Account:
    """Add an account that still has to enrol; raise :class:`Conflict` if the
    e-mail address is taken (in any organisation: it is the login name)."""
    normalised = normalise_email(email)
    taken = Conflict("an account with this e-mail address exists already")
    if await conn.scalar(sa.select(accounts.c.id).where(accounts.c.email == normalised)):
        raise taken
    account_id = uuid.uuid4()
    try:
        await conn.execute(
            accounts.insert().values(
                id=account_id,
                organisation_id=organisation_id,
                email=normalised,
                role=role.value,
                created_at=now,
            )
        )
    except sa.exc.IntegrityError as err:
        # Added by another transaction since the check (PostgreSQL: two admins
        # at once, a double click); its error text quotes the address.
        if _EMAIL_TAKEN in str(err.orig) or _EMAIL_TAKEN_SQLITE in str(err.orig):
            raise taken from None
        raise
    return await get_account(conn, account_id)


# How each database names the broken constraint of an address already taken.
_EMAIL_TAKEN = "uq_accounts_email"
_EMAIL_TAKEN_SQLITE = "accounts.email"


async def get_account(
    conn: AsyncConnection, account_id: uuid.UUID, *, organisation_id: uuid.UUID | None = None
) -> Account:
    """Return the account; with ``organisation_id``, only one of that organisation."""
    query = sa.select(accounts).where(accounts.c.id == account_id)
    if organisation_id is not None:
        query = query.where(accounts.c.organisation_id == organisation_id)
    row = (await conn.execute(query)).first()
    if row is None:
        raise NotFound("no such account")
    return _account(row)


async def find_account_by_email(conn: AsyncConnection, email: str) -> Account | None:
    """Return the account with this (normalised) address, or None."""
    row = (await conn.execute(sa.select(accounts).where(accounts.c.email == email))).first()
    return None if row is None else _account(row)


async def list_accounts(conn: AsyncConnection, organisation_id: uuid.UUID) -> list[Account]:
    rows = await conn.execute(
        sa.select(accounts)
        .where(accounts.c.organisation_id == organisation_id)
        .order_by(accounts.c.email)
    )
    return [_account(row) for row in rows]


async def last_logins(
    conn: AsyncConnection, organisation_id: uuid.UUID
) -> dict[uuid.UUID, datetime]:
    """When each account of the organisation last logged in, from the access
    log (``session.login``; as far back as the log's retention keeps it)."""
    rows = await conn.execute(
        sa.select(access_log.c.actor_id, sa.func.max(access_log.c.at))
        .where(
            access_log.c.organisation_id == organisation_id,
            access_log.c.action == "session.login",
            access_log.c.outcome == "allowed",
            access_log.c.actor_id.is_not(None),
        )
        .group_by(access_log.c.actor_id)
    )
    return {actor_id: at for actor_id, at in rows}


async def ensure_another_active_admin(conn: AsyncConnection, account: Account) -> None:
    if account.role is not Role.ADMIN or account.status is not AccountStatus.ACTIVE:
        return
    # Lock the organisation's admin rows first (PostgreSQL; SQLite's
    # transactions are serial anyway): two admins disabling each other at
    # the same moment must not both see the other as the one who remains.
    await conn.execute(
        sa.select(accounts.c.id)
        .where(
            accounts.c.organisation_id == account.organisation_id,
            accounts.c.role == Role.ADMIN.value,
        )
        .with_for_update()
    )
    others = await conn.scalar(
        sa.select(sa.func.count())
        .select_from(accounts)
        .where(
            accounts.c.organisation_id == account.organisation_id,
            accounts.c.role == Role.ADMIN.value,
            accounts.c.id != account.id,
            accounts.c.enrolled_at.is_not(None),
            accounts.c.disabled_at.is_(None),
        )
    )
    if not others:
        raise Conflict("this is the organisation's last active admin; make another admin first")


async def set_role(conn: AsyncConnection, account: Account, role: Role) -> Account:
    """Change the role; never leaves an organisation without an active admin.

    The account's sessions end: what it may do was decided at login, so it
    logs in again with the new role (and its open consult sockets close).
    """
    if role is not account.role:
        await ensure_another_active_admin(conn, account)
        await conn.execute(
            accounts.update().where(accounts.c.id == account.id).values(role=role.value)
        )
        await end_sessions_of(conn, account.id)
    return await get_account(conn, account.id)


async def disable_account(conn: AsyncConnection, account: Account, *, now: datetime) -> Account:
    """Disable the account and end all its sessions at once."""
    if account.status is not AccountStatus.DISABLED:
        await ensure_another_active_admin(conn, account)
        await conn.execute(
            accounts.update().where(accounts.c.id == account.id).values(disabled_at=now)
        )
    await end_sessions_of(conn, account.id)
    return await get_account(conn, account.id)


async def enable_account(conn: AsyncConnection, account: Account) -> Account:
    await conn.execute(
        accounts.update().where(accounts.c.id == account.id).values(disabled_at=None)
    )
    return await get_account(conn, account.id)


async def reset_totp(
    conn: AsyncConnection, account: Account, *, password_too: bool = False
) -> Account:
    """Forget the TOTP secret (and with ``password_too`` the password): the
    account must enrol again; its sessions end."""
    if account.status is AccountStatus.ACTIVE:
        await ensure_another_active_admin(conn, account)
    forget: dict[str, None] = {"totp_secret_sealed": None, "totp_last_step": None}
    if password_too:
        forget["password_hash"] = None
    await conn.execute(
        accounts.update().where(accounts.c.id == account.id).values(enrolled_at=None, **forget)
    )
    await end_sessions_of(conn, account.id)
    return await get_account(conn, account.id)


async def claim_totp_step(conn: AsyncConnection, account_id: uuid.UUID, step: int) -> bool:
    """Record ``step`` as used; False if it (or a later one) was used already.

    One conditional UPDATE, so two logins racing with the same code (on one
    node or several) cannot both win.
    """
    result = await conn.execute(
        accounts.update()
        .where(
            accounts.c.id == account_id,
            sa.or_(accounts.c.totp_last_step.is_(None), accounts.c.totp_last_step < step),
        )
        .values(totp_last_step=step)
    )
    return result.rowcount == 1


async def update_password_hash(
    conn: AsyncConnection, account_id: uuid.UUID, password_hash: str
) -> None:
    """Store a re-hashed password (after the hashing parameters changed)."""
    await conn.execute(
        accounts.update().where(accounts.c.id == account_id).values(password_hash=password_hash)
    )


async def end_sessions_of(conn: AsyncConnection, account_id: uuid.UUID) -> None:
    await conn.execute(sessions.delete().where(sessions.c.account_id == account_id))


# --- enrolment links ---------------------------------------------------------


async def issue_enrolment_link(
    conn: AsyncConnection, account: Account, *, now: datetime, ttl_s: int
) -> tuple[str, datetime]:
    """Make a new one-time link token for ``account``; older unused ones stop working.

    Returns the token (shown once, never stored) and its expiry.
    """
    await conn.execute(
        enrolment_links.delete().where(
            enrolment_links.c.account_id == account.id, enrolment_links.c.used_at.is_(None)
        )
    )
    token = secrets.token_urlsafe(32)
    expires_at = now + timedelta(seconds=ttl_s)
    await conn.execute(
        enrolment_links.insert().values(
            token_hash=token_hash(token),
            account_id=account.id,
            created_at=now,
            expires_at=expires_at,
        )
    )
    return token, expires_at


async def open_enrolment_link(conn: AsyncConnection, token: str, *, now: datetime) -> EnrolmentLink:
    """Return the link's state; :class:`NotFound` for unknown, used or expired links
    and for disabled accounts (one answer for all, so the token reveals nothing)."""
    row = (
        await conn.execute(
            sa.select(enrolment_links).where(enrolment_links.c.token_hash == token_hash(token))
        )
    ).first()
    if row is None or row.used_at is not None or row.expires_at <= now:
        raise NotFound("this enrolment link is not valid (any more)")
    account = await get_account(conn, row.account_id)
    if account.status is AccountStatus.DISABLED:
        raise NotFound("this enrolment link is not valid (any more)")
    return EnrolmentLink(
        token_hash=row.token_hash,
        account=account,
        expires_at=row.expires_at,
        pending_password_hash=row.pending_password_hash,
        pending_totp_secret_sealed=row.pending_totp_secret_sealed,
    )


async def set_enrolment_pending(
    conn: AsyncConnection, link: EnrolmentLink, *, password_hash: str, totp_secret_sealed: bytes
) -> None:
    """Keep the chosen password and the new TOTP secret until a code confirms them."""
    await conn.execute(
        enrolment_links.update()
        .where(enrolment_links.c.token_hash == link.token_hash)
        .values(pending_password_hash=password_hash, pending_totp_secret_sealed=totp_secret_sealed)
    )


async def complete_enrolment(
    conn: AsyncConnection, link: EnrolmentLink, *, totp_step: int, now: datetime
) -> Account:
    """Make the pending password and secret the account's; use up the link.

    ``totp_step`` is the step of the confirming code, which counts as used.
    """
    if link.pending_password_hash is None or link.pending_totp_secret_sealed is None:
        raise Conflict("set a password before confirming a code")
    used = await conn.execute(
        enrolment_links.update()
        .where(enrolment_links.c.token_hash == link.token_hash, enrolment_links.c.used_at.is_(None))
        .values(used_at=now, pending_password_hash=None, pending_totp_secret_sealed=None)
    )
    if used.rowcount != 1:
        raise NotFound("this enrolment link is not valid (any more)")
    await conn.execute(
        accounts.update()
        .where(accounts.c.id == link.account.id)
        .values(
            password_hash=link.pending_password_hash,
            totp_secret_sealed=link.pending_totp_secret_sealed,
            totp_last_step=totp_step,
            enrolled_at=now,
        )
    )
    return await get_account(conn, link.account.id)


async def purge_enrolment_links(conn: AsyncConnection, *, now: datetime) -> int:
    """Delete links that are used or expired (with any pending password or secret)."""
    result = await conn.execute(
        enrolment_links.delete().where(
            sa.or_(enrolment_links.c.used_at.is_not(None), enrolment_links.c.expires_at <= now)
        )
    )
    return result.rowcount
