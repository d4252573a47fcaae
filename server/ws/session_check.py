"""Therapists' signaling sockets held to their login sessions.

Every therapist socket is kept in a registry under its session
(:func:`register`); a periodic job (:func:`check_therapist_sessions`) closes
the sockets whose session ended and keeps the others' sessions alive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from audit.sessions import Session, live_sessions
from server.app_keys import CLOCK, DB_ENGINE, SETTINGS, THERAPIST_SOCKETS
from signaling.protocol import CloseCode

if TYPE_CHECKING:
    from server.ws.connection import Connection

# Sessions looked up per query (the check runs every sessions.socket_check_s).
SESSION_CHECK_BATCH = 500


def register(app: web.Application, connection: Connection, session: Session | None) -> None:
    """Keep a therapist's socket in the registry the session check walks."""
    if session is not None:
        app[THERAPIST_SOCKETS].setdefault(session.id_hash, set()).add(connection)


def unregister(app: web.Application, connection: Connection, session_hash: str | None) -> None:
    """Take a closed socket out of the registry (``session_hash``: its session's)."""
    if session_hash is None:
        return
    registry = app[THERAPIST_SOCKETS]
    connections = registry.get(session_hash)
    if connections is not None:
        connections.discard(connection)
        if not connections:
            del registry[session_hash]


async def check_therapist_sessions(app: web.Application) -> int:
    """Close the therapist sockets whose login session ended (logout, disabled
    account, absolute timeout) with ``SESSION_ENDED`` (4002), and keep the others' sessions alive:
    an open consult socket counts as activity. Returns how many were closed.

    One query per batch of sessions, however many sockets are open.
    """
    registry = app[THERAPIST_SOCKETS]
    hashes = list(registry)
    settings = app[SETTINGS].sessions
    now = app[CLOCK].now()
    live: set[str] = set()
    for start in range(0, len(hashes), SESSION_CHECK_BATCH):
        async with app[DB_ENGINE].begin() as conn:
            live |= await live_sessions(
                conn,
                hashes[start : start + SESSION_CHECK_BATCH],
                now=now,
                idle_timeout_s=settings.idle_timeout_s,
                absolute_timeout_s=settings.absolute_timeout_s,
            )
    closed = 0
    for id_hash in hashes:
        if id_hash in live:
            continue
        for connection in list(registry.get(id_hash, ())):
            await connection.close(code=CloseCode.SESSION_ENDED, message=b"session ended")
            closed += 1
    return closed
