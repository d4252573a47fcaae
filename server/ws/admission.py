"""Who may open the signaling socket: the checks at the door, before the upgrade.

- a therapist, by the session cookie, for one of their own consults
  (``/ws?consult=<id>``);
- a patient, by a single-use ticket made from their invite
  (``/ws?ticket=<ticket>``), the invite checked again at every (re)connect.

Either way the upgrade request must come from our own origin: a cookie alone
must not let another site's page act as the therapist.
"""

from __future__ import annotations

import contextlib
import secrets
import uuid

from aiohttp import web
from redis.exceptions import RedisError

from audit.access_log import Actor, ClientType, Outcome
from audit.accounts import Account
from audit.consults import InviteInvalid, get_consult
from audit.db import reading
from audit.errors import AccessLogNotWritten, NotFound
from audit.invite_use import open_invite_by_hash
from audit.roles import Role
from audit.sealing import looks_like_token
from audit.sessions import Session
from server.app_keys import ACCESS_LOG, CLOCK, DB_ENGINE, DB_STATEMENTS, TICKETS
from server.auth.sessions import authenticate
from server.web_security import HOST_UNKNOWN, expected_origin
from signaling.ports import StateUnavailable
from signaling.protocol import ParticipantRole
from signaling.state import Participant


class Refused(Exception):
    """The socket is not opened: answered with ``status`` and an error ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


async def admit_connection(request: web.Request) -> tuple[Participant, Session | None]:
    """The participant this request may open a socket for, and (for a
    therapist) the login session it belongs to. Raises :class:`Refused`."""
    expected = expected_origin(request)
    if expected is None:
        raise Refused(403, "host_unknown", HOST_UNKNOWN)
    if request.headers.get("Origin") != expected:
        raise Refused(403, "origin_refused", "the socket must be opened from our own pages")
    connection_id = secrets.token_urlsafe(12)
    ticket = request.query.get("ticket")
    if ticket is not None:
        return await _patient(request.app, ticket, connection_id), None
    principal = await authenticate(request)
    if principal is None:
        raise Refused(401, "not_logged_in", "log in, or use the ticket of an invite")
    try:
        consult_id: uuid.UUID | None = uuid.UUID(request.query.get("consult", ""))
    except ValueError:
        consult_id = None
    if principal.account.role is not Role.THERAPIST:
        # Recorded as the API records a refusal for the wrong role.
        await _record_refusal(request, principal.account, consult_id)
        raise Refused(403, "forbidden", "only the consult's therapist may join it")
    consult = None
    if consult_id is not None:
        with contextlib.suppress(NotFound):
            async with reading(request.app[DB_ENGINE]) as conn:
                consult = await get_consult(conn, consult_id, therapist_id=principal.account.id)
    if consult is None:
        await _record_refusal(request, principal.account, consult_id)
        raise Refused(404, "not_found", "no such consult")
    if consult.is_over:
        raise Refused(409, "consult_over", "the consult has ended")
    return (
        Participant(consult.id, ParticipantRole.THERAPIST, connection_id),
        principal.session,
    )


async def _patient(app: web.Application, ticket: str, connection_id: str) -> Participant:
    if not looks_like_token(ticket):
        raise Refused(401, "ticket_invalid", "the ticket is unknown, used or expired")
    try:
        grant = await app[TICKETS].claim(ticket, now=app[CLOCK].now())
    except (StateUnavailable, RedisError):
        raise Refused(
            503, "unavailable", "the server cannot check the ticket right now; try again"
        ) from None
    if grant is None:
        raise Refused(401, "ticket_invalid", "the ticket is unknown, used or expired")
    try:
        async with app[DB_STATEMENTS].reading() as db:
            await open_invite_by_hash(
                db, grant.invite_hash, now=app[CLOCK].now(), consult_id=grant.consult_id
            )
    except InviteInvalid as err:
        raise Refused(403, f"invite_{err.problem.value}", str(err)) from None
    return Participant(grant.consult_id, ParticipantRole.PATIENT, connection_id)


# The access record of an attempt on a consult that is not the therapist's
# (or none), or by an account of another role, as the API writes one for its
# routes.
JOIN_ACTION = "consult.join"


async def _record_refusal(
    request: web.Request, account: Account, consult_id: uuid.UUID | None
) -> None:
    app = request.app
    try:
        await app[ACCESS_LOG].record(
            Actor(account.id, account.role.value, ClientType.WEBSOCKET),
            organisation_id=account.organisation_id,
            action=JOIN_ACTION,
            object_type="consult",
            object_id=consult_id,
            now=app[CLOCK].now(),
            outcome=Outcome.REFUSED,
        )
    except AccessLogNotWritten:
        raise Refused(
            503, "unavailable", "the server cannot record this right now; try again"
        ) from None
