"""Therapists' signaling sockets held to their login sessions.

Every therapist socket is kept in a registry under its session
(:func:`registered`); a periodic job (:func:`check_therapist_sessions`) closes
the sockets whose session ended and keeps the others' sessions alive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from audit.sessions import Session, live_sessions
from server.app_keys import CLOCK, DB_ENGINE, SETTINGS, THERAPIST_SOCKETS
from signaling.protocol import CloseCode

# Sessions looked up per query (the check runs every sessions.socket_check_s).
SESSION_CHECK_BATCH = 500


@asynccontextmanager
async def registered(
    request: web.Request, websocket: web.WebSocketResponse, session: Session | None
) -> AsyncIterator[None]:
    """Keep a therapist's socket in the registry the session check walks."""
    if session is None:
        yield
        return
    registry = request.app[THERAPIST_SOCKETS]
    registry.setdefault(session.id_hash, set()).add(websocket)
    try:
        yield
    finally:
        sockets = registry.get(session.id_hash)
        if sockets is not None:
            sockets.discard(websocket)
            if not sockets:
                del registry[session.id_hash]


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
        for websocket in list(registry.get(id_hash, ())):
            await websocket.close(code=CloseCode.SESSION_ENDED, message=b"session ended")
            closed += 1
    return closed
