"""The patient's receipt: issued to the page of an invite link, read by its holder.

- ``POST /api/invites/{token}/receipt``: once the consult has started and
  while it is not over, the invite link's page asks for a receipt link,
  which it offers at the end (the invite itself stops working then), with
  the key its socket was given once admitted
  (:func:`audit.receipts.receipt_key`; the therapist's never is);
- ``GET /api/receipts/{token}``: the receipt (see :mod:`audit.receipts`),
  access-logged as the patient's read before it is answered;
- ``GET /receipt/{token}``: its page; 404 (still the page, which explains)
  for a receipt that is not known.

No session anywhere: the token is the credential, and requests count
against the client's limit (:mod:`server.client_limits`).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from aiohttp import web
from pydantic import Field
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.access_log import AccessRecord, Actor, ClientType
from audit.consults import get_consult
from audit.db import reading
from audit.direct import OnConnection
from audit.errors import NotFound
from audit.receipts import (
    PATIENT_ROLE,
    ConsultNotStarted,
    Receipt,
    ReceiptUnknown,
    issue_receipt,
    open_receipt,
    organisation_of,
    read_receipt,
    receipt_key_matches,
)
from server.api.body import RequestBody, read_json
from server.api.consult_views import INVITE_TOKEN, usable_invite
from server.api.errors import ConflictError, Forbidden, NotFoundError, Unprocessable
from server.api.representations import iso
from server.app_keys import ACCESS_LOG, CLOCK, DB_ENGINE, MASTER_KEY
from server.not_found import STATIC_DIR, wants_page
from server.web_security import link_origin

routes = web.RouteTableDef()

RECEIPT_PAGE = STATIC_DIR / "receipt.html"
# The patient reading their receipt: no account, only the link.
RECEIPT_HOLDER = Actor(None, PATIENT_ROLE, ClientType.API)
ACTION_READ = "receipt.read"


class ReceiptNotFound(NotFoundError):
    code = "receipt_unknown"


class ReceiptBody(RequestBody):
    # What the admitted patient's socket was given, once (``admitted``):
    # audit.receipts.receipt_key.
    receipt_key: Annotated[str, Field(min_length=1, max_length=128)]


class ReceiptKeyWrong(Forbidden):
    code = "receipt_key_wrong"


@routes.post("/api/invites/" + INVITE_TOKEN + "/receipt")
async def receipt_issue(request: web.Request) -> web.Response:
    """A receipt link for the invite's consult, shown once: the invite must
    still work, the consult have started, and the request carry the key only
    the admitted patient's socket is given (the therapist holds the invite
    link too, and a receipt lists who looked at the consult)."""
    app = request.app
    origin = link_origin(request)
    now = app[CLOCK].now()
    if not request.can_read_body:
        raise Unprocessable(
            "receipt_key: required: the key the patient's socket is given once admitted"
        )
    body = await read_json(request, ReceiptBody)
    async with app[DB_ENGINE].begin() as conn:
        invite = await usable_invite(OnConnection(conn), request, now)
        if not receipt_key_matches(app[MASTER_KEY].key, invite.consult_id, body.receipt_key):
            raise ReceiptKeyWrong(
                "receipt_key is not this consult's: a receipt is for the admitted patient's page"
            )
        try:
            token = await issue_receipt(conn, await get_consult(conn, invite.consult_id))
        except ConsultNotStarted as err:
            raise ConflictError(str(err), code="consult_not_started") from None
    return web.json_response(
        {"receipt_token": token, "receipt_url": f"{origin}/receipt/{token}"}, status=201
    )


async def _consult_of(conn: AsyncConnection, token: str) -> uuid.UUID:
    try:
        return await open_receipt(conn, token)
    except ReceiptUnknown as err:
        raise ReceiptNotFound(str(err)) from None


@routes.get("/api/receipts/{token}")
async def receipt_read(request: web.Request) -> web.Response:
    """The receipt: the consult's times, its recording, who looked at its record."""
    app = request.app
    async with reading(app[DB_ENGINE]) as conn:
        consult_id = await _consult_of(conn, request.match_info["token"])
        organisation_id = await organisation_of(conn, await get_consult(conn, consult_id))
    # Recorded before it is read, so that the answer shows this read too.
    await app[ACCESS_LOG].record(
        RECEIPT_HOLDER,
        organisation_id=organisation_id,
        action=ACTION_READ,
        object_type="consult",
        object_id=consult_id,
        now=app[CLOCK].now(),
    )
    try:
        async with reading(app[DB_ENGINE]) as conn:
            receipt = await read_receipt(conn, consult_id)
    except NotFound:  # purged in between
        raise ReceiptNotFound(str(ReceiptUnknown())) from None
    return web.json_response(receipt_json(receipt))


@routes.get("/receipt/{token}")
async def receipt_page(request: web.Request) -> web.StreamResponse:
    """The receipt's page; its script reads the receipt through the API."""
    async with reading(request.app[DB_ENGINE]) as conn:
        try:
            await open_receipt(conn, request.match_info["token"])
        except ReceiptUnknown as err:
            if not wants_page(request):
                raise ReceiptNotFound(str(err)) from None
            # The page itself says, in the reader's language, what happened.
            return web.Response(
                status=404,
                body=RECEIPT_PAGE.read_bytes(),
                content_type="text/html",
                charset="utf-8",
            )
    return web.FileResponse(RECEIPT_PAGE)


def receipt_json(receipt: Receipt) -> dict[str, Any]:
    consult = receipt.consult
    return {
        "consult": {
            "status": consult.status.value,
            "started_at": iso(consult.started_at),
            "ended_at": iso(consult.ended_at),
            "duration_s": consult.duration_s,
        },
        "recording": {"recorded": receipt.recorded, "exists": receipt.recording_exists},
        "accesses": [_access_json(record) for record in receipt.accesses],
        "truncated": receipt.truncated,
    }


def _access_json(record: AccessRecord) -> dict[str, Any]:
    return {
        "at": iso(record.at),
        "role": record.actor_role,
        # The account's id, as the practice's access log names it (for a
        # message sent to the practice's record system, the webhook
        # endpoint's id); none for the patient, the operator or the purge.
        "pseudonym": str(record.actor_id) if record.actor_id is not None else None,
        "action": record.action,
        "outcome": record.outcome.value,
    }
