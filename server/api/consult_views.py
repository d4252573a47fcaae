"""Consults for therapists, and the patient's side of an invite link."""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import structlog
from aiohttp import web
from pydantic import Field
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.access_log import Outcome
from audit.consults import (
    Consult,
    Invite,
    InviteInvalid,
    InviteProblem,
    LinkState,
    create_consult,
    get_consult,
    invite_expiry,
    issue_invite,
    latest_invite_guardian_consent,
    link_states,
    list_consults,
    live_invite_expiry,
    revoke_invites,
)
from audit.db import reading
from audit.direct import Statements
from audit.errors import NotFound
from audit.invite_use import note_invite_used, open_invite
from audit.keyring import load_ring
from audit.labels import read_labels, store_label
from audit.practice import PracticeSettings, practice_settings_of
from audit.references import check_reference, store_reference
from audit.roles import Role
from audit.sealing import TOKEN_PATTERN
from server.api.access_records import (
    record_api_access,
    record_in,
    record_read,
    record_reads_of,
)
from server.api.body import RequestBody, read_json
from server.api.errors import ApiError, ConflictError, NotFoundError, Unprocessable
from server.api.invite_mailing import (
    EmailAddress,
    mail_invite,
    require_mail_configured,
    waiting_room_opens_at,
)
from server.api.query import NO_PARAMS, query_number, query_params, query_uuid
from server.api.representations import consult_json, invite_json, iso
from server.app_keys import CLOCK, DB_ENGINE, DB_STATEMENTS, MASTER_KEY, ROOMS, SETTINGS, TICKETS
from server.auth.sessions import Principal, require_role
from server.web_security import link_origin
from signaling.ports import StateUnavailable
from signaling.protocol import EndReason
from signaling.tickets import TicketGrant

routes = web.RouteTableDef()

CONSULT_PATH = "/api/consults/{consult_id}"
INVITE_TOKEN = "{token:" + TOKEN_PATTERN + "}"
# The consults list, a page at a time: the most a page holds, and its default.
CONSULTS_PAGE = 100

# Plain words for a patient holding a link that does not work.
INVITE_ANSWERS = {
    InviteProblem.UNKNOWN: (404, "This link is not known. Check that you copied all of it."),
    InviteProblem.EXPIRED: (410, "This link has expired. Ask your therapist for a new one."),
    InviteProblem.REVOKED: (
        410,
        "This link is no longer valid. Your therapist may have sent you a new one.",
    ),
    InviteProblem.CONSULT_OVER: (410, "This consultation has ended."),
}


class NewConsultBody(RequestBody):
    scheduled_at: str | None = None
    # The therapist's label for the patient, kept sealed until the consult ends.
    display_name: Annotated[str, Field(min_length=1, max_length=80)] | None = None
    # The patient is under 16: a parent or guardian consents too.
    guardian_consent: bool = False
    # Where to mail the link: used for this one send, never stored.
    email: EmailAddress | None = None
    # The practice's own reference for the appointment (where its settings
    # allow it): sealed, sent in the consult's webhooks, then destroyed.
    appointment_reference: str | None = None


class ReissueBody(RequestBody):
    email: EmailAddress | None = None


class TicketBody(RequestBody):
    # The patient (and, where the invite asks for it, a parent or guardian)
    # agreed in the page before joining.
    consent: bool
    guardian_consent: bool = False


class InviteGone(ApiError):
    def __init__(self, problem: InviteProblem) -> None:
        status, message = INVITE_ANSWERS[problem]
        super().__init__(message, code=f"invite_{problem.value}")
        self.status = status


class TooEarly(ConflictError):
    """The appointment is later: the waiting room opens at ``opens_at``."""

    def __init__(self, opens_at: datetime) -> None:
        super().__init__(
            f"the waiting room opens at {iso(opens_at)}; come back then",
            code="waiting_room_not_open",
        )


def _parse_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise Unprocessable("field 'scheduled_at' must be an ISO 8601 date and time") from None
    if moment.tzinfo is None:
        raise Unprocessable("field 'scheduled_at' needs a time zone offset (e.g. +01:00 or Z)")
    try:
        moment.astimezone(UTC)  # stored in UTC: it must exist there
    except OverflowError:
        raise Unprocessable(
            "field 'scheduled_at' is out of range: in UTC it would fall before the year 1"
            " or after 9999"
        ) from None
    return moment


async def _log(
    request: web.Request, principal: Principal, action: str, consult_id: uuid.UUID
) -> None:
    await record_api_access(
        request, principal, action=action, object_type="consult", object_id=consult_id
    )


async def _log_in(
    conn: AsyncConnection,
    request: web.Request,
    principal: Principal,
    action: str,
    consult_id: uuid.UUID,
) -> None:
    """The change's record, in the change's own transaction."""
    await record_in(
        conn, request, principal, action=action, object_type="consult", object_id=consult_id
    )


async def _own_consult(request: web.Request, principal: Principal, action: str) -> Consult:
    """The therapist's own consult; any other id (another therapist's
    consult, none, not an id) is refused with 404 and recorded as ``action``
    refused, as an attempt on a recording or an account is."""
    try:
        consult_id: uuid.UUID | None = uuid.UUID(request.match_info["consult_id"])
    except ValueError:
        consult_id = None
    if consult_id is not None:
        with contextlib.suppress(NotFound):
            async with reading(request.app[DB_ENGINE]) as conn:
                return await get_consult(conn, consult_id, therapist_id=principal.account.id)
    await record_read(
        request,
        principal,
        action=action,
        object_type="consult",
        object_id=consult_id,
        outcome=Outcome.REFUSED,
    )
    raise NotFoundError("no such consult")


async def practice_of(app: web.Application, principal: Principal) -> PracticeSettings:
    async with reading(app[DB_ENGINE]) as conn:
        return await practice_settings_of(conn, principal.account.organisation_id)


async def invite_validity_s(app: web.Application, principal: Principal) -> int:
    """How long the therapist's invite links work: the practice's setting,
    within the server's."""
    practice = await practice_of(app, principal)
    return practice.invite_validity(app[SETTINGS].consults.invite_validity_s)


def _appointment_reference(body: NewConsultBody, practice: PracticeSettings) -> str | None:
    """The body's appointment reference, if valid and the practice allows one."""
    if body.appointment_reference is None:
        return None
    if not practice.appointment_reference_allowed:
        raise Unprocessable(
            "field 'appointment_reference' is not accepted: this practice does not attach "
            "appointment references (an admin can allow it in the practice settings)",
            code="appointment_reference_not_allowed",
        )
    return check_reference(body.appointment_reference)


@routes.post("/api/consults")
async def consults_create(request: web.Request) -> web.Response:
    """Create a consult and its invite link (shown once)."""
    principal = await require_role(request, Role.THERAPIST, action="consult.create")
    body = await read_json(request, NewConsultBody)
    scheduled_at = _parse_time(body.scheduled_at)
    app = request.app
    if body.email is not None:
        require_mail_configured(app)
    now = app[CLOCK].now()
    practice = await practice_of(app, principal)
    reference = _appointment_reference(body, practice)
    validity_s = practice.invite_validity(app[SETTINGS].consults.invite_validity_s)
    try:
        expires_at = invite_expiry(now=now, scheduled_at=scheduled_at, validity_s=validity_s)
    except OverflowError:  # the invite's end would lie past 9999-12-31
        raise Unprocessable(
            "field 'scheduled_at' is too far in the future: the invite would end after 9999"
        ) from None
    origin = link_origin(request)
    display_name = body.display_name
    async with app[DB_ENGINE].begin() as conn:
        consult = await create_consult(
            conn, therapist_id=principal.account.id, now=now, scheduled_at=scheduled_at
        )
        if display_name is not None or reference is not None:
            # Sealed under keys of their own, wrapped by the ring's current key.
            wrapping = (await load_ring(conn, app[MASTER_KEY].key)).current
            if display_name is not None:
                await store_label(conn, wrapping, consult.id, display_name)
            if reference is not None:
                await store_reference(conn, wrapping, consult.id, reference)
        token, invite = await issue_invite(
            conn,
            consult,
            now=now,
            expires_at=expires_at,
            guardian_consent=body.guardian_consent,
        )
        # In the change's transaction: no consult without its record.
        await _log_in(conn, request, principal, "consult.create", consult.id)
    try:
        await app[ROOMS].prepare(consult.id, until=expires_at)
    except (StateUnavailable, RedisError) as err:
        # Redis (several nodes) is away: the consult and its link stand, its
        # room is opened when someone joins.
        _log_unavailable("consult.create", err)
    answer = {
        "consult": consult_json(consult, link=LinkState.LIVE, display_name=display_name),
        **invite_json(token, invite, origin=origin),
    }
    if body.email is not None:
        answer["invite_email"] = await mail_invite(
            request, consult, invite, answer["invite_url"], body.email
        )
    return web.json_response(answer, status=201)


@routes.get("/api/consults")
async def consults_list(request: web.Request) -> web.Response:
    """The therapist's own consults by their time (the appointment, else when
    made), latest first, a page at a time: ``before`` (the last page's
    ``next_before``) asks for those after that consult, ``limit`` for how many."""
    principal = await require_role(request, Role.THERAPIST, action="consult.list")
    params = query_params(request, frozenset({"before", "limit"}))
    limit = query_number(params, "limit", default=CONSULTS_PAGE, low=1, high=CONSULTS_PAGE)
    before = query_uuid(params, "before", what="a consult's id, the last page's next_before")
    # Reads only (the record goes through the access-log writer). Each
    # statement sees its own snapshot, on either database, as in a
    # read-committed transaction: a link state may be a moment newer than
    # its consult's row.
    found: list[Consult] | None
    async with reading(request.app[DB_ENGINE]) as conn:
        try:
            found = await list_consults(
                conn, principal.account.id, limit=limit + 1, older_than=before
            )
        except NotFound:
            found = None
        else:
            found, more = found[:limit], len(found) > limit
            links = await link_states(conn, found, now=request.app[CLOCK].now())
    if found is None:
        # The attempt names the consult asked for, as a refused read of one does.
        await record_read(
            request,
            principal,
            action="consult.list",
            object_type="consult",
            object_id=before,
            outcome=Outcome.REFUSED,
        )
        raise Unprocessable(
            "parameter 'before' must be the id of one of your consults, and that one "
            "is not: load the list again from the start"
        )
    await record_read(
        request,
        principal,
        action="consult.list",
        object_type="therapist",
        object_id=principal.account.id,
    )
    names = await _labels(request.app, [consult.id for consult in found])
    # Each label shown is a read of that consult's personal data.
    await record_reads_of(
        request,
        principal,
        action="consult.list",
        object_type="consult",
        object_ids=[consult_id for consult_id, name in names.items() if name is not None],
    )
    return web.json_response(
        {
            "consults": [
                consult_json(consult, link=links[consult.id], display_name=names[consult.id])
                for consult in found
            ],
            "next_before": str(found[-1].id) if more else None,
        }
    )


@routes.get(CONSULT_PATH)
async def consult_show(request: web.Request) -> web.Response:
    principal = await require_role(request, Role.THERAPIST, action="consult.read")
    query_params(request, NO_PARAMS)
    consult = await _own_consult(request, principal, "consult.read")
    await record_read(
        request,
        principal,
        action="consult.read",
        object_type="consult",
        object_id=consult.id,
    )
    names = await _labels(request.app, [consult.id])
    async with reading(request.app[DB_ENGINE]) as conn:
        links = await link_states(conn, [consult], now=request.app[CLOCK].now())
    shown = consult_json(consult, link=links[consult.id], display_name=names[consult.id])
    return web.json_response({"consult": shown})


@routes.post(CONSULT_PATH + "/end")
async def consult_end(request: web.Request) -> web.Response:
    """End the consult for everyone connected; its invites stop working."""
    principal = await require_role(request, Role.THERAPIST, action="consult.end")
    consult = await _own_consult(request, principal, "consult.end")
    try:
        await request.app[ROOMS].end(consult.id, reason=EndReason.ENDED_BY_THERAPIST)
    except (StateUnavailable, RedisError) as err:
        # The record is ended first, and it is what counts: once Redis is
        # back, the nodes' repair round finds the consult over and closes its
        # participants' sockets (Recovery.reconcile).
        _log_unavailable("consult.end", err)
    async with reading(request.app[DB_ENGINE]) as conn:
        ended = await get_consult(conn, consult.id)
        links = await link_states(conn, [ended], now=request.app[CLOCK].now())
    await _log(request, principal, "consult.end", consult.id)
    return web.json_response({"consult": consult_json(ended, link=links[ended.id])})


@routes.post(CONSULT_PATH + "/invite")
async def consult_reissue_invite(request: web.Request) -> web.Response:
    """Make a new invite link; the old one stops working."""
    principal = await require_role(request, Role.THERAPIST, action="consult.invite")
    consult = await _own_consult(request, principal, "consult.invite")
    app = request.app
    # The body is optional: {"email": ...} mails the new link too.
    body = await read_json(request, ReissueBody) if request.can_read_body else ReissueBody()
    if body.email is not None:
        require_mail_configured(app)
    origin = link_origin(request)
    now = app[CLOCK].now()
    validity_s = await invite_validity_s(app, principal)
    async with app[DB_ENGINE].begin() as conn:
        # A consult scheduled days ahead keeps its late expiry.
        current = await live_invite_expiry(conn, consult.id, now=now)
        expires_at = max(
            invite_expiry(now=now, scheduled_at=consult.scheduled_at, validity_s=validity_s),
            current or now,
        )
        # The new link asks for a guardian's consent when the previous one did.
        guardian_consent = await latest_invite_guardian_consent(conn, consult.id)
        token, invite = await issue_invite(
            conn, consult, now=now, expires_at=expires_at, guardian_consent=guardian_consent
        )
        await _log_in(conn, request, principal, "consult.invite", consult.id)
    # The old link is revoked: whoever waits with it is sent away, as by a
    # revoke (the new link is in nobody's hands before this answer).
    await _send_away_waiting(app, consult.id, "consult.invite")
    answer: dict[str, Any] = invite_json(token, invite, origin=origin)
    if body.email is not None:
        answer["invite_email"] = await mail_invite(
            request, consult, invite, answer["invite_url"], body.email
        )
    return web.json_response(answer)


@routes.delete(CONSULT_PATH + "/invite")
async def consult_revoke_invite(request: web.Request) -> web.Response:
    """Revoke the invite link: it no longer opens the consult, nor lets anyone back in."""
    principal = await require_role(request, Role.THERAPIST, action="consult.invite.revoke")
    consult = await _own_consult(request, principal, "consult.invite.revoke")
    async with request.app[DB_ENGINE].begin() as conn:
        await revoke_invites(conn, consult.id, now=request.app[CLOCK].now())
        await _log_in(conn, request, principal, "consult.invite.revoke", consult.id)
    await _send_away_waiting(request.app, consult.id, "consult.invite.revoke")
    return web.Response(status=204)


async def _send_away_waiting(app: web.Application, consult_id: uuid.UUID, action: str) -> None:
    """The consult's link was revoked: a patient waiting with it is sent
    away; an admitted one stays."""
    try:
        await app[ROOMS].link_revoked(consult_id)
    except (StateUnavailable, RedisError) as err:
        # The link is revoked all the same: nobody gets in or back with it.
        _log_unavailable(action, err)


async def _labels(
    app: web.Application, consult_ids: list[uuid.UUID]
) -> dict[uuid.UUID, str | None]:
    """The therapist's labels, unsealed (those of consults that are over are gone)."""
    async with reading(app[DB_ENGINE]) as conn:
        return await read_labels(conn, app[MASTER_KEY].key, consult_ids)


def _log_unavailable(action: str, err: BaseException) -> None:
    structlog.get_logger("videoconsult.server").warning(
        "shared state unavailable; answered without it", action=action, error=type(err).__name__
    )


async def usable_invite(db: Statements, request: web.Request, now: datetime) -> Invite:
    """The invite of the request's link if it can be used now; :class:`InviteGone` if not."""
    try:
        return await open_invite(db, request.match_info["token"], now=now)
    except InviteInvalid as err:
        raise InviteGone(err.problem) from None


async def _open(request: web.Request) -> tuple[Invite, datetime | None]:
    """The invite, and when its waiting room opens (None: it is open)."""
    now = request.app[CLOCK].now()
    # A read only (the patient's page asks on every load): no write lock on SQLite.
    async with request.app[DB_STATEMENTS].reading() as db:
        invite = await usable_invite(db, request, now)
    return invite, _opens_at(request.app, invite, now)


def _opens_at(app: web.Application, invite: Invite, now: datetime) -> datetime | None:
    """When the invite's waiting room opens; None once it is open."""
    opens_at = waiting_room_opens_at(app, invite.scheduled_at)
    if opens_at is not None and (opens_at <= now or invite.consult_started):
        return None
    return opens_at


@routes.get("/api/invites/" + INVITE_TOKEN)
async def invite_status(request: web.Request) -> web.Response:
    """Whether the link works, in words a patient understands; nothing about anyone."""
    invite, opens_at = await _open(request)
    return web.json_response(
        {
            "valid": True,
            "expires_at": iso(invite.expires_at),
            "guardian_consent": invite.guardian_consent,
            # Set while it is too early: the waiting room opens then.
            "opens_at": iso(opens_at),
        }
    )


@routes.post("/api/invites/" + INVITE_TOKEN + "/ticket")
async def invite_ticket(request: web.Request) -> web.Response:
    """A single-use ticket to open the signaling socket (``/ws?ticket=...``),
    once the patient (and where asked, a parent or guardian) has consented."""
    body = await read_json(request, TicketBody)
    app = request.app
    now = app[CLOCK].now()
    # The check and the note of first use on the way in's own path
    # (audit/direct.py): a storm of patients arriving at once (issue 19). The
    # note is one statement of its own (on PostgreSQL no BEGIN or COMMIT; on
    # SQLite in its turn's batch of writes); the check before it only reads.
    async with app[DB_STATEMENTS].autocommit() as db:
        invite = await usable_invite(db, request, now)
        opens_at = _opens_at(app, invite, now)
        if opens_at is not None:
            raise TooEarly(opens_at)
        _consents_given(body, invite)
        await note_invite_used(db, invite, now=now)
    ttl_s = app[SETTINGS].consults.ticket_ttl_s
    ticket = await app[TICKETS].issue(
        TicketGrant(invite.consult_id, invite.token_hash), now=now, ttl_s=ttl_s
    )
    return web.json_response({"ticket": ticket, "expires_in_s": ttl_s})


def _consents_given(body: TicketBody, invite: Invite) -> None:
    if not body.consent:
        raise Unprocessable(
            "field 'consent' must be true: the patient agrees before joining",
            code="consent_required",
        )
    if invite.guardian_consent and not body.guardian_consent:
        raise Unprocessable(
            "field 'guardian_consent' must be true: this invite is for a patient under 16, "
            "and a parent or guardian agrees before joining",
            code="guardian_consent_required",
        )
