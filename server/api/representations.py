"""How stored things look in API answers: every ``*_json`` of the API, in one place.

Each takes what it shows and the few facts of the request it needs (the
origin for a link, the clock's now), never the request itself.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import segno

from audit.access_log import AccessRecord
from audit.accounts import Account
from audit.consults import Consult, Invite, LinkState
from audit.notices import Notice
from audit.recordings import RecordingEntry
from audit.retention import Retention
from audit.sessions import Session
from audit.support import SupportConsult
from config import SessionSettings
from server.auth.admin import EnrolmentInvitation
from server.auth.sessions import session_ends_at


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def account_json(account: Account) -> dict[str, Any]:
    """An account as the API shows it: never a hash, never a secret."""
    return {
        "id": str(account.id),
        "email": account.email,
        "role": account.role.value,
        "status": account.status.value,
        "created_at": iso(account.created_at),
        "enrolled_at": iso(account.enrolled_at),
        "disabled_at": iso(account.disabled_at),
        "external_id": account.external_id,
    }


def session_json(
    account: Account, session: Session, *, settings: SessionSettings, now: datetime
) -> dict[str, object]:
    """The logged-in professional and when their session ends."""
    absolute_end = session.created_at + timedelta(seconds=settings.absolute_timeout_s)
    return {
        "account": account_json(account),
        "session": {
            "ends_at": iso(session_ends_at(session, settings=settings)),
            "absolute_end_at": iso(absolute_end),
            # The same, counted from now: a page whose clock is off counts right.
            "absolute_end_in_s": max(0, int((absolute_end - now).total_seconds())),
            "idle_timeout_s": settings.idle_timeout_s,
        },
    }


def notice_json(notice: Notice) -> dict[str, object]:
    """A notice for the account holder: what happened, when, and by whom."""
    return {
        "id": notice.id,
        "kind": notice.kind.value,
        "at": iso(notice.at),
        "by_role": notice.by_role,
        "by_email": notice.by_email,
    }


def invitation_json(invitation: EnrolmentInvitation, *, origin: str) -> dict[str, Any]:
    """A new or reset account and the link (on ``origin``) that enrols it."""
    url = f"{origin}/enrol/{invitation.token}"
    return {
        "account": account_json(invitation.account),
        "enrolment_token": invitation.token,
        "enrolment_url": url,
        "enrolment_expires_at": iso(invitation.expires_at),
        # To scan from another device: the link as a QR code (an SVG data URL).
        "enrolment_qr": segno.make(url, error="m").svg_data_uri(scale=4, border=2),
    }


def access_record_json(entry: AccessRecord) -> dict[str, Any]:
    """One access record as an admin reads it (pseudonymous ids only)."""
    return {
        "seq": entry.seq,
        "at": iso(entry.at),
        "actor_id": str(entry.actor_id) if entry.actor_id else None,
        "actor_role": entry.actor_role,
        "action": entry.action,
        "object_type": entry.object_type,
        "object_id": entry.object_id,
        "outcome": entry.outcome.value,
        "client_type": entry.client_type.value,
        "hash": entry.hash,
    }


def retention_json(retention: Retention) -> dict[str, int]:
    return {
        "consult_days": retention.consult_days,
        "recording_days": retention.recording_days,
        "access_log_days": retention.access_log_days,
    }


def _consult_metadata(consult: Consult | SupportConsult) -> dict[str, Any]:
    """What every role may see of a consult: its id, status and times."""
    return {
        "id": str(consult.id),
        "status": consult.status.value,
        "created_at": iso(consult.created_at),
        "started_at": iso(consult.started_at),
        "ended_at": iso(consult.ended_at),
        "duration_s": consult.duration_s,
    }


def consult_json(
    consult: Consult, *, link: LinkState, display_name: str | None = None
) -> dict[str, Any]:
    """A consult as its therapist sees it, with whether its invite link works."""
    return {
        **_consult_metadata(consult),
        "scheduled_at": iso(consult.scheduled_at),
        # The therapist's label, unsealed; gone once the consult is over.
        "display_name": display_name,
        "link": link.value,
    }


def invite_json(token: str, invite: Invite, *, origin: str) -> dict[str, Any]:
    """A consult's invite and the link (on ``origin``) the patient follows."""
    return {
        "invite_token": token,
        "invite_url": f"{origin}/join/{token}",
        "invite_expires_at": iso(invite.expires_at),
        "guardian_consent": invite.guardian_consent,
    }


def support_consult_json(consult: SupportConsult, *, end_reason: str | None) -> dict[str, Any]:
    """A consult as support sees it: no name, no account id, no invite; how it
    ended where the technical log still says (from the technical log)."""
    return {**_consult_metadata(consult), "therapist": consult.therapist, "end_reason": end_reason}


def recording_json(entry: RecordingEntry) -> dict[str, Any]:
    """A recording as the therapist who made it sees it (never its key)."""
    consent = entry.consent
    return {
        "id": str(entry.id),
        "consult_id": str(entry.consult_id),
        "created_at": iso(entry.created_at),
        "ended_at": iso(entry.ended_at),
        "status": entry.status.value,
        "duration_s": entry.duration_s,
        "consent": None
        if consent is None
        else {
            "requested_at": iso(consent.requested_at),
            "consented_at": iso(consent.consented_at),
            "consent_by": consent.by.value,
        },
        "stop_reason": entry.stop_reason.value if entry.stop_reason else None,
        "plaintext_bytes": entry.plaintext_bytes,
    }
