"""E-mail invitations through a real SMTP server (aiosmtpd, STARTTLS or TLS, AUTH):
what the patient receives, what the therapist is told, and that the address
is kept nowhere."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import icalendar
import pytest
import sqlalchemy as sa

from audit.clock import ManualClock
from audit.roles import Role
from audit.schema import metadata
from audit.technical_log import read_technical
from config import SettingsError
from server import create_app
from server.app_keys import DB_ENGINE, TECHNICAL_LOG
from server.resources import ROOM_TIMER_POLL
from tests.support.databases import QUICK_ON_SQLITE
from tests.support.harness import ConsultSetup, Harness, new_consult
from tests.support.ports import unused_port
from tests.support.settings import SettingsFactory
from tests.support.smtp import SmtpServer, running_smtp_server

pytestmark = [
    # aiosmtpd's own warnings, about the test server: AUTH over implicit TLS
    # (it counts only STARTTLS as TLS), and its internal use of login_data.
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning"),
    pytest.mark.filterwarnings("ignore:Session.login_data is deprecated"),
]

PATIENT = "j.de.vries@patient.example"
SCHEDULED = datetime(2026, 11, 24, 10, 30, tzinfo=UTC)


@pytest.fixture(params=["starttls"])
def smtp_server(
    request: pytest.FixtureRequest, tmp_path: Path, free_port: int
) -> Iterator[SmtpServer]:
    with running_smtp_server(tmp_path, free_port, security=request.param) as server:
        yield server


async def mail_harness(
    make_settings: SettingsFactory,
    database_url: str,
    clock: ManualClock,
    aiohttp_client: Any,
    **smtp: Any,
) -> Harness:
    """The real app on this database, sending through the given SMTP settings."""
    app = create_app(make_settings(database_url=database_url, **smtp), clock=clock)
    app[ROOM_TIMER_POLL] = 3600.0
    return Harness(app, await aiohttp_client(app), clock)


@pytest.fixture
async def harness(
    make_settings: SettingsFactory,
    database_url: str,
    clock: ManualClock,
    aiohttp_client: Any,
    smtp_server: SmtpServer,
) -> Harness:
    return await mail_harness(
        make_settings, database_url, clock, aiohttp_client, **smtp_server.settings()
    )


async def mailed_consult(harness: Harness, **body: Any) -> tuple[ConsultSetup, Any]:
    """A therapist creates a consult and has its link mailed to the patient."""
    therapist = await harness.professional("therapist@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(therapist)
    response = await harness.post("/api/consults", {**body, "email": PATIENT})
    assert response.status == 201, await response.text()
    answer = await response.json()
    setup = ConsultSetup(therapist, answer["consult"]["id"], answer["invite_token"])
    return setup, answer


def parts(message: EmailMessage) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for part in message.walk():
        if part.get_content_maintype() == "multipart":
            continue
        found[part.get_content_type()] = part.get_content()
    return found


async def technical_kinds(
    harness: Harness, consult_id: str, expected: tuple[str, Any]
) -> list[tuple[str, Any]]:
    """The consult's technical-log entries, once ``expected`` is among them
    (the app's own flush job may be writing them at the same moment)."""
    kinds: list[tuple[str, Any]] = []
    for _ in range(50):
        await harness.app[TECHNICAL_LOG].flush(harness.app[DB_ENGINE])
        async with harness.app[DB_ENGINE].connect() as conn:
            entries = await read_technical(conn, now=harness.clock.now(), subject=consult_id)
        kinds = [(entry.kind, dict(entry.detail)) for entry in entries]
        if expected in kinds:
            break
        await asyncio.sleep(0.05)
    return kinds


async def test_an_invitation_is_mailed_as_text_html_and_a_calendar_entry_with_a_working_link(
    harness: Harness, smtp_server: SmtpServer
) -> None:
    setup, answer = await mailed_consult(harness, scheduled_at=SCHEDULED.isoformat())
    assert answer["invite_email"] == {"sent": True}
    mailbox = smtp_server.mailbox
    assert len(mailbox.messages) == 1
    assert mailbox.recipients == [[PATIENT]]
    assert mailbox.tls_seen == [True]
    assert mailbox.logins == [("praktijk-noord", True)]
    message = mailbox.messages[0]
    assert message["To"] == PATIENT
    assert message["Subject"] == "Your video consultation"
    link = f"{harness.origin}/join/{setup.invite_token}"
    found = parts(message)
    assert link in found["text/plain"]
    assert "24-11-2026 at 11:30 (CET)" in found["text/plain"]  # Europe/Amsterdam
    assert f'href="{link}"' in found["text/html"]
    calendar = icalendar.Calendar.from_ical(found["text/calendar"])
    (event,) = calendar.walk("VEVENT")
    assert event.decoded("dtstart") == SCHEDULED
    assert event.decoded("dtend") == SCHEDULED + timedelta(minutes=30)
    assert str(event["url"]) == link
    assert str(event["uid"]).startswith(setup.consult_id)
    # The link in the mail opens the consult.
    path = link.removeprefix(harness.origin).replace("/join/", "/api/invites/")
    assert (await harness.client.get(path)).status == 200
    sent: tuple[str, Any] = ("invite_sent", {})
    assert sent in await technical_kinds(harness, setup.consult_id, sent)


async def test_the_answer_says_the_mail_was_accepted(harness: Harness) -> None:
    therapist_setup = await new_consult(harness)
    response = await harness.post(
        f"/api/consults/{therapist_setup.consult_id}/invite", {"email": PATIENT}
    )
    assert response.status == 200, await response.text()
    answer = await response.json()
    assert answer["invite_email"] == {"sent": True}
    assert PATIENT not in await response.text()


async def test_a_reissued_link_is_mailed_and_the_old_one_stops_working(
    harness: Harness, smtp_server: SmtpServer
) -> None:
    setup = await new_consult(harness, scheduled_at=SCHEDULED.isoformat())
    assert smtp_server.mailbox.messages == []
    response = await harness.post(f"/api/consults/{setup.consult_id}/invite", {"email": PATIENT})
    answer = await response.json()
    assert answer["invite_email"] == {"sent": True}
    (message,) = smtp_server.mailbox.messages
    assert answer["invite_url"] in parts(message)["text/plain"]
    assert setup.invite_token not in parts(message)["text/plain"]
    assert (await harness.client.get(f"/api/invites/{setup.invite_token}")).status == 410


@pytest.mark.parametrize("smtp_server", ["tls"], indirect=True)
async def test_an_invitation_goes_over_implicit_tls_too(
    harness: Harness, smtp_server: SmtpServer
) -> None:
    await mailed_consult(harness)
    assert smtp_server.mailbox.tls_seen == [True]
    (message,) = smtp_server.mailbox.messages
    # No appointment time: no calendar entry.
    assert set(parts(message)) == {"text/plain", "text/html"}


async def test_the_mail_is_in_the_practices_language(
    make_settings: SettingsFactory,
    database_url: str,
    clock: ManualClock,
    aiohttp_client: Any,
    smtp_server: SmtpServer,
) -> None:
    harness = await mail_harness(
        make_settings,
        database_url,
        clock,
        aiohttp_client,
        **smtp_server.settings(smtp_language="nl"),
    )
    await mailed_consult(harness, scheduled_at=SCHEDULED.isoformat())
    (message,) = smtp_server.mailbox.messages
    assert message["Subject"] == "Uw videoconsult"
    text = parts(message)["text/plain"]
    assert "Afspraak: 24-11-2026 om 11:30 (CET)." in text
    assert "U kunt vanaf 24-11-2026 om 11:15 (CET) in de wachtkamer terecht." in text
    assert 'lang="nl"' in parts(message)["text/html"]


async def test_a_refused_login_is_told_to_the_therapist_and_the_link_still_stands(
    make_settings: SettingsFactory,
    database_url: str,
    clock: ManualClock,
    aiohttp_client: Any,
    smtp_server: SmtpServer,
) -> None:
    harness = await mail_harness(
        make_settings,
        database_url,
        clock,
        aiohttp_client,
        **smtp_server.settings(smtp_password="not the password"),
    )
    setup = await new_consult(harness)
    response = await harness.post(f"/api/consults/{setup.consult_id}/invite", {"email": PATIENT})
    assert response.status == 200
    answer = await response.json()
    assert answer["invite_email"]["sent"] is False
    assert answer["invite_email"]["error"]["code"] == "email_login_refused"
    assert "refused the login" in answer["invite_email"]["error"]["message"]
    # aiosmtplib tries each mechanism the server offers (PLAIN, LOGIN).
    assert smtp_server.mailbox.logins
    assert all(not accepted for _, accepted in smtp_server.mailbox.logins)
    assert smtp_server.mailbox.messages == []
    # The new link works: the therapist can copy it by hand.
    token = answer["invite_token"]
    assert (await harness.client.get(f"/api/invites/{token}")).status == 200
    failed: tuple[str, Any] = ("invite_failed", {"reason": "login_refused"})
    assert failed in await technical_kinds(harness, setup.consult_id, failed)


async def test_a_mail_server_that_offers_no_starttls_is_a_tls_failure_and_gets_no_mail(
    make_settings: SettingsFactory,
    database_url: str,
    clock: ManualClock,
    aiohttp_client: Any,
    tmp_path: Path,
    free_port: int,
) -> None:
    # Found in review: told to the therapist as "could not be reached".
    with running_smtp_server(tmp_path, free_port, security="plain") as server:
        harness = await mail_harness(
            make_settings,
            database_url,
            clock,
            aiohttp_client,
            **server.settings(smtp_security="starttls"),
        )
        setup = await new_consult(harness)
        response = await harness.post(
            f"/api/consults/{setup.consult_id}/invite", {"email": PATIENT}
        )
        answer = await response.json()
        assert answer["invite_email"]["sent"] is False
        assert answer["invite_email"]["error"]["code"] == "email_tls_failed"
        assert server.mailbox.messages == []  # never sent in the clear instead


async def test_an_unreachable_mail_server_is_told_to_the_therapist(
    make_settings: SettingsFactory,
    database_url: str,
    clock: ManualClock,
    aiohttp_client: Any,
    smtp_server: SmtpServer,
) -> None:
    # A port on which nothing listens (the fixture's server is on another).
    closed_port = unused_port()
    harness = await mail_harness(
        make_settings,
        database_url,
        clock,
        aiohttp_client,
        **smtp_server.settings(smtp_port=closed_port),
    )
    therapist = await harness.professional("t@praktijk-noord.example", role=Role.THERAPIST)
    await harness.logged_in(therapist)
    response = await harness.post("/api/consults", {"email": PATIENT})
    assert response.status == 201
    answer = await response.json()
    assert answer["invite_email"]["error"]["code"] == "email_unreachable"
    assert answer["invite_email"]["error"]["message"] == (
        "the practice's mail server could not be reached"
    )
    assert answer["invite_url"]


async def test_the_address_is_in_no_log_line_and_no_table(
    make_settings: SettingsFactory,
    database_url: str,
    clock: ManualClock,
    aiohttp_client: Any,
    smtp_server: SmtpServer,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    good = await mail_harness(
        make_settings, database_url, clock, aiohttp_client, **smtp_server.settings()
    )
    setup, _ = await mailed_consult(good, scheduled_at=SCHEDULED.isoformat())
    refused = await good.post(f"/api/consults/{setup.consult_id}/invite", {"email": "x@y"})
    assert refused.status == 422
    assert "x@y" not in await refused.text()
    assert len(smtp_server.mailbox.messages) == 1
    failing = await mail_harness(
        make_settings,
        database_url,
        clock,
        aiohttp_client,
        **smtp_server.settings(smtp_password="wrong"),
    )
    await failing.logged_in(setup.therapist)
    failed = await failing.post(f"/api/consults/{setup.consult_id}/invite", {"email": PATIENT})
    assert (await failed.json())["invite_email"]["sent"] is False
    for harness in (good, failing):
        await harness.app[TECHNICAL_LOG].flush(harness.app[DB_ENGINE])
    captured = capfd.readouterr()
    # Every log record of this process but the test mail server's own
    # (aiosmtpd's "mail.log", which stands for the practice's server).
    ours = [
        logging.Formatter("%(name)s %(message)s %(args)s").format(record)
        for record in caplog.records
        if not record.name.startswith("mail.log")
    ]
    logged = "\n".join([*ours, captured.out, captured.err])
    assert "invite sent" in logged
    assert "invite failed" in logged
    assert "patient.example" not in logged
    async with good.app[DB_ENGINE].connect() as conn:
        for table in metadata.sorted_tables:
            rows = (await conn.execute(sa.select(table))).all()
            assert "patient.example" not in repr(rows), table.name


async def test_an_address_without_a_mail_server_is_refused_before_anything_is_made(
    make_settings: SettingsFactory,
    database_url: str,
    clock: ManualClock,
    aiohttp_client: Any,
) -> None:
    harness = await mail_harness(make_settings, database_url, clock, aiohttp_client)
    therapist = await harness.professional("t@praktijk-noord.example", role=Role.THERAPIST)
    await harness.logged_in(therapist)
    response = await harness.post("/api/consults", {"email": PATIENT})
    assert response.status == 409
    error = (await response.json())["error"]
    assert error["code"] == "email_not_configured"
    assert "smtp.host" in error["message"]
    listing = await (await harness.client.get("/api/consults")).json()
    assert listing["consults"] == []


@pytest.mark.parametrize(
    "address",
    [
        "no-at-sign.example",
        "two@@example.nl",
        "a b@example.nl",
        "x@localhost",
        5,
        # Found in review: each passed the check, then the mail went elsewhere
        # (a group, a comment) or composing it failed after the consult was
        # made (500, the link lost).
        "(@b.cd)",
        "=?utf-8?b??=@b.cd",
        "a:b@c.de",
        "a(b@c.de",
    ],
)
@QUICK_ON_SQLITE
async def test_a_malformed_address_is_refused_naming_the_field(
    harness: Harness, address: Any
) -> None:
    therapist = await harness.professional("t@praktijk-noord.example", role=Role.THERAPIST)
    await harness.logged_in(therapist)
    response = await harness.post("/api/consults", {"email": address})
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["message"].startswith("field 'email'")
    assert str(address) not in error["message"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            {
                "smtp_host": "mail.example.nl",
                "smtp_from_address": "video@praktijk.example",
                "smtp_username": "u",
                "smtp_security": "none",
            },
            "never sent in the clear",
        ),
        ({"smtp_host": "mail.example.nl"}, "smtp.from_address"),
        # Found in review: plain text to another host without a login, and a
        # sender that is a header of its own, were let through.
        (
            {
                "smtp_host": "mail.example.nl",
                "smtp_from_address": "video@praktijk.example",
                "smtp_security": "none",
            },
            "a relay on this machine only",
        ),
        (
            {"smtp_host": "mail.example.nl", "smtp_from_address": "a@b.nl\r\nBcc: x@y.nl"},
            "must be one address",
        ),
        (
            {"smtp_host": "mail.example.nl", "smtp_from_address": "a@b.nl, c@d.nl"},
            "must be one address",
        ),
        ({"smtp_time_zone": "Europe/Atlantis"}, "is not a time zone"),
        # A folder of the time zone database: ZoneInfo raises IsADirectoryError.
        ({"smtp_time_zone": "Europe"}, "is not a time zone"),
        ({"smtp_security": "ssl"}, "smtp.security"),
    ],
)
def test_bad_mail_settings_stop_the_start_naming_the_problem(
    make_settings: SettingsFactory, overrides: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=named):
        make_settings(**overrides)


def test_a_relay_on_this_machine_may_take_a_login_without_tls(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(
        smtp_host="127.0.0.1",
        smtp_username="u",
        smtp_security="none",
        smtp_from_address="video@praktijk.example",
    )
    assert settings.smtp.enabled


def test_a_ca_file_that_is_not_there_stops_the_start(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    """Found in review: a wrong smtp.ca_file failed each send with a 500,
    after the consult was made."""
    with pytest.raises(SettingsError, match="is not a file"):
        make_settings(smtp_ca_file=str(tmp_path / "missing.pem"))
