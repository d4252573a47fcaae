"""E-mailing a patient's invite link, for the consult views.

The address a therapist types is checked, used for one send and dropped:
not stored, not logged, not put in an answer. The technical log says
``invite_sent`` or ``invite_failed`` (with the reason) for the consult; the
therapist's answer says at once whether the mail server took the message.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from email.errors import HeaderParseError
from email.message import EmailMessage
from typing import Annotated, Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import structlog
from aiohttp import web
from pydantic import AfterValidator, Field

from audit.consults import Consult, Invite
from server.api.errors import ConflictError
from server.app_keys import CLOCK, SETTINGS, TECHNICAL_LOG
from server.invite_mail import Invitation, compose_invitation
from server.smtp import REASONS, MailFailed, MailProblem, send_mail

__all__ = ["EmailAddress", "mail_invite", "require_mail_configured", "waiting_room_opens_at"]

_log = structlog.get_logger("videoconsult.server")

# Enough to catch a typo (no "@", a space, no domain); the mail server
# decides the rest, and its refusal is told to the therapist.
_ADDRESS = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\".]+")


def _looks_like_address(value: str) -> str:
    if _ADDRESS.fullmatch(value) is None or not _one_plain_recipient(value):
        raise ValueError("must be an e-mail address like name@example.nl")
    return value


def _one_plain_recipient(value: str) -> bool:
    """Whether the mail's To header, parsed as the send will parse it, names
    exactly this one address (not a group, a comment or an encoded word)."""
    header = EmailMessage()
    try:
        header["To"] = value
        found = header["To"].addresses
    except (ValueError, IndexError, HeaderParseError):
        return False
    return len(found) == 1 and found[0].addr_spec == value and "=?" not in value


EmailAddress = Annotated[
    str, Field(min_length=3, max_length=254), AfterValidator(_looks_like_address)
]


def waiting_room_opens_at(app: web.Application, scheduled_at: datetime | None) -> datetime | None:
    """When the patient may enter the waiting room; None: at once (no appointment)."""
    if scheduled_at is None:
        return None
    before_s = app[SETTINGS].consults.waiting_room_opens_before_s
    return scheduled_at - timedelta(seconds=before_s)


def require_mail_configured(app: web.Application) -> None:
    """409 before anything is made when an address is given but no mail server is set."""
    if not app[SETTINGS].smtp.enabled:
        raise ConflictError(REASONS[MailProblem.NOT_CONFIGURED], code="email_not_configured")


async def mail_invite(
    request: web.Request, consult: Consult, invite: Invite, link: str, address: str
) -> dict[str, Any]:
    """Send the invitation; the answer's ``invite_email`` part (sent, or the error)."""
    app = request.app
    settings = app[SETTINGS].smtp
    now = app[CLOCK].now()
    invitation = Invitation(
        consult_id=consult.id,
        link=link,
        expires_at=invite.expires_at,
        scheduled_at=consult.scheduled_at,
        opens_at=waiting_room_opens_at(app, consult.scheduled_at),
        domain=urlsplit(link).hostname or "localhost",
    )
    message = compose_invitation(
        invitation,
        sender=settings.from_address,
        recipient=address,
        language=settings.language,
        zone=ZoneInfo(settings.time_zone),
        now=now,
    )
    technical = app[TECHNICAL_LOG].log
    try:
        await send_mail(settings, message)
    except MailFailed as err:
        technical.info("invite_failed", subject=str(consult.id), reason=err.problem.value)
        _log.warning("invite failed", reason=err.problem.value)
        return {
            "sent": False,
            "error": {"code": f"email_{err.problem.value}", "message": err.reason},
        }
    technical.info("invite_sent", subject=str(consult.id))
    _log.info("invite sent")
    return {"sent": True}
