"""The invitation mail: the patient's link, as plain text, HTML and a calendar entry.

:func:`compose_invitation` only builds the message (no network); it is sent
by :mod:`server.smtp`. The patient's address goes into the message's ``To``
header and nowhere else: the caller passes it straight on to the mail server
and keeps no copy (DESIGN.md, promise 11).
"""

from __future__ import annotations

import html
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Literal
from zoneinfo import ZoneInfo

import icalendar

__all__ = ["Invitation", "compose_invitation"]

Language = Literal["en", "nl"]

# The calendar entry's length. The consult has no planned length; half an
# hour is the usual block in a practice's agenda, and the link works longer.
CALENDAR_BLOCK = timedelta(minutes=30)

_TEXT: dict[Language, dict[str, str]] = {
    "en": {
        "subject": "Your video consultation",
        "greeting": "Hello,",
        "intro": "You are invited to a video consultation with your therapist.",
        "when": "Appointment: {when}.",
        "opens": "You can enter the waiting room from {opens}.",
        "link": "Open this link on your computer, tablet or phone to join:",
        "valid": "The link is valid until {until}. Do not share it: it is for you only.",
        "stored": "Only the start, the end and the duration of the consultation are stored.",
        "summary": "Video consultation",
        "button": "Join the consultation",
        "date": "%d-%m-%Y at %H:%M",
    },
    "nl": {
        "subject": "Uw videoconsult",
        "greeting": "Goedendag,",
        "intro": "U bent uitgenodigd voor een videoconsult met uw behandelaar.",
        "when": "Afspraak: {when}.",
        "opens": "U kunt vanaf {opens} in de wachtkamer terecht.",
        "link": "Open deze link op uw computer, tablet of telefoon om deel te nemen:",
        "valid": "De link is geldig tot {until}. Deel hem niet: hij is alleen voor u.",
        "stored": "Alleen het begin, het einde en de duur van het consult worden bewaard.",
        "summary": "Videoconsult",
        "button": "Deelnemen aan het consult",
        "date": "%d-%m-%Y om %H:%M",
    },
}


@dataclass(frozen=True)
class Invitation:
    """What the patient is told; no name and no address of anyone in it."""

    consult_id: uuid.UUID
    link: str
    expires_at: datetime
    scheduled_at: datetime | None
    opens_at: datetime | None
    # The sending host, for the message id and the calendar entry's UID.
    domain: str


def compose_invitation(
    invitation: Invitation,
    *,
    sender: str,
    recipient: str,
    language: Language,
    zone: ZoneInfo,
    now: datetime,
) -> EmailMessage:
    """The mail: plain text and HTML alternatives, and an ``.ics`` entry
    when the consult has an appointment time."""
    words = _TEXT[language]

    def local(moment: datetime) -> str:
        stamp = moment.astimezone(zone)
        return f"{stamp.strftime(words['date'])} ({stamp.tzname()})"

    lines = [words["greeting"], "", words["intro"]]
    if invitation.scheduled_at is not None:
        lines.append(words["when"].format(when=local(invitation.scheduled_at)))
    if invitation.opens_at is not None:
        lines.append(words["opens"].format(opens=local(invitation.opens_at)))
    valid = words["valid"].format(until=local(invitation.expires_at))
    text = "\n".join([*lines, "", words["link"], invitation.link, "", valid, words["stored"], ""])

    message = EmailMessage()
    message["Subject"] = words["subject"]
    message["From"] = sender
    message["To"] = recipient
    message["Message-ID"] = make_msgid(domain=invitation.domain)
    message["Content-Language"] = language
    message.set_content(text)
    message.add_alternative(_html(words, lines, invitation.link, valid, language), subtype="html")
    if invitation.scheduled_at is not None:
        message.add_attachment(
            _calendar(invitation, invitation.scheduled_at, words, now=now),
            maintype="text",
            subtype="calendar",
            filename="consult.ics",
            params={"method": "PUBLISH"},
        )
    return message


def _html(
    words: dict[str, str], lines: list[str], link: str, valid: str, language: Language
) -> str:
    paragraphs = "".join(f"<p>{html.escape(line)}</p>" for line in lines if line)
    href = html.escape(link, quote=True)
    return (
        f'<!doctype html><html lang="{language}"><head><meta charset="utf-8">'
        f"<title>{html.escape(words['subject'])}</title></head><body>"
        f"{paragraphs}<p>{html.escape(words['link'])}</p>"
        f'<p><a href="{href}">{html.escape(words["button"])}</a></p>'
        f"<p>{href}</p><p>{html.escape(valid)}</p><p>{html.escape(words['stored'])}</p>"
        "</body></html>"
    )


def _calendar(
    invitation: Invitation, start: datetime, words: dict[str, str], *, now: datetime
) -> bytes:
    calendar = icalendar.Calendar()
    calendar.add("prodid", "-//videoconsult//invitation//EN")
    calendar.add("version", "2.0")
    calendar.add("method", "PUBLISH")
    event = icalendar.Event()
    # One entry per consult: a reissued link updates the same entry.
    event.add("uid", f"{invitation.consult_id}@{invitation.domain}")
    event.add("dtstamp", now)
    event.add("dtstart", start)
    event.add("dtend", start + CALENDAR_BLOCK)
    event.add("summary", words["summary"])
    event.add("description", f"{words['link']}\n{invitation.link}")
    event.add("url", invitation.link)
    event.add("location", invitation.link)
    calendar.add_component(event)
    ical: bytes = calendar.to_ical()
    return ical
