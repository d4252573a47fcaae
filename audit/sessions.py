"""Server-side login sessions and the record of failed logins.

A session is known by the hash of its cookie value only. Timeouts are the
caller's rule (it passes the limits); this module keeps and forgets.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.schema import accounts, login_failures, sessions
from audit.sealing import token_hash


@dataclass(frozen=True)
class Session:
    id_hash: str
    account_id: uuid.UUID
    created_at: datetime
    last_seen_at: datetime


async def create_session(
    conn: AsyncConnection, account_id: uuid.UUID, *, now: datetime
) -> tuple[str, Session]:
    """Start a session; return the cookie value (never stored) and the session."""
    session_id = secrets.token_urlsafe(32)
    session = Session(token_hash(session_id), account_id, now, now)
    await conn.execute(
        sessions.insert().values(
            id_hash=session.id_hash, account_id=account_id, created_at=now, last_seen_at=now
        )
    )
    return session_id, session


async def find_session(conn: AsyncConnection, session_id: str) -> Session | None:
    return await find_session_by_hash(conn, token_hash(session_id))


async def find_session_by_hash(conn: AsyncConnection, id_hash: str) -> Session | None:
    row = (await conn.execute(sa.select(sessions).where(sessions.c.id_hash == id_hash))).first()
    if row is None:
        return None
    return Session(row.id_hash, row.account_id, row.created_at, row.last_seen_at)


async def touch_session(conn: AsyncConnection, session: Session, *, now: datetime) -> None:
    await conn.execute(
        sessions.update().where(sessions.c.id_hash == session.id_hash).values(last_seen_at=now)
    )


async def end_session(conn: AsyncConnection, id_hash: str) -> None:
    await conn.execute(sessions.delete().where(sessions.c.id_hash == id_hash))


async def purge_sessions(
    conn: AsyncConnection, *, now: datetime, idle_timeout_s: int, absolute_timeout_s: int
) -> int:
    """Delete sessions past either timeout; return how many."""
    result = await conn.execute(
        sessions.delete().where(
            sa.or_(
                sessions.c.last_seen_at <= now - timedelta(seconds=idle_timeout_s),
                sessions.c.created_at <= now - timedelta(seconds=absolute_timeout_s),
            )
        )
    )
    return result.rowcount


async def record_login_attempt(
    conn: AsyncConnection, *, subject_hash: str, client_hash: str, now: datetime
) -> int:
    """Record an attempt as failed before it is checked; return its id.

    Counting attempts up front, and forgiving them on success
    (:func:`forget_login_attempt`), means a burst of parallel attempts is
    counted as it arrives, not after the slow password checks are done.
    """
    result = await conn.execute(
        login_failures.insert()
        .values(subject_hash=subject_hash, client_hash=client_hash, failed_at=now)
        .returning(login_failures.c.id)
    )
    return int(result.scalar_one())


async def forget_login_attempt(conn: AsyncConnection, attempt_id: int) -> None:
    await conn.execute(login_failures.delete().where(login_failures.c.id == attempt_id))


async def login_failures_before(
    conn: AsyncConnection,
    attempt_id: int,
    since: datetime,
    *,
    subject_hash: str | None = None,
    client_hash: str | None = None,
) -> list[datetime]:
    """Return the times of failures recorded before ``attempt_id`` and after
    ``since``, for a subject or a client, oldest first."""
    query = sa.select(login_failures.c.failed_at).where(
        login_failures.c.failed_at > since, login_failures.c.id < attempt_id
    )
    if subject_hash is not None:
        query = query.where(login_failures.c.subject_hash == subject_hash)
    if client_hash is not None:
        query = query.where(login_failures.c.client_hash == client_hash)
    return list(await conn.scalars(query.order_by(login_failures.c.id)))


async def purge_login_failures(conn: AsyncConnection, *, before: datetime) -> int:
    result = await conn.execute(login_failures.delete().where(login_failures.c.failed_at <= before))
    return result.rowcount


async def live_sessions(
    conn: AsyncConnection,
    id_hashes: list[str],
    *,
    now: datetime,
    idle_timeout_s: int,
    absolute_timeout_s: int,
) -> set[str]:
    """Of ``id_hashes``, those whose session holds (not timed out, account
    enrolled and enabled); they are touched, as in use. One query each way."""
    if not id_hashes:
        return set()
    rows = await conn.execute(
        sa.select(sessions.c.id_hash)
        .join(accounts, accounts.c.id == sessions.c.account_id)
        .where(
            sessions.c.id_hash.in_(id_hashes),
            sessions.c.last_seen_at > now - timedelta(seconds=idle_timeout_s),
            sessions.c.created_at > now - timedelta(seconds=absolute_timeout_s),
            accounts.c.enrolled_at.is_not(None),
            accounts.c.disabled_at.is_(None),
        )
    )
    live = {row.id_hash for row in rows}
    if live:
        await conn.execute(
            sessions.update().where(sessions.c.id_hash.in_(live)).values(last_seen_at=now)
        )
    return live
