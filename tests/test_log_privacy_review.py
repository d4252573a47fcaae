"""Privacy review of what the server writes to its process log (stdout) and
to the technical log: each test here failed on the code it was written against.

The process log carries no personal data at all (docs DESIGN "Promises",
the data inventory): no addresses, names, browsers, tokens. Personal
diagnostics go to the 24-hour technical log only.
"""

from __future__ import annotations

import asyncio
import io
import uuid

import pytest
import sqlalchemy as sa

from audit.accounts import Role
from audit.schema import accounts, technical_log
from audit.technical_log import DropReason
from server.app_keys import DB_ENGINE, TECHNICAL_LOG
from server.process_log import configure_process_logging
from tests.support.harness import Harness, Sockets, new_consult, receive


def _process_log() -> io.StringIO:
    stream = io.StringIO()
    configure_process_logging(level="info", log_format="json", stream=stream)
    return stream


# A professional's address as email_validator (audit/accounts.py,
# normalise_email) accepts it: "/" is one of the characters RFC 5322 allows
# in a local part, as are ! # $ & * = ? ^ ` { | } ~.
ADDRESS_WITH_SLASH = "j.de.vries/praktijk-noord@example.nl"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_admins_adding_the_same_address_put_no_part_of_it_in_the_process_log(
    harness: Harness,
) -> None:
    """create_account looks for the address, then inserts (audit/accounts.py,
    create_account): an insert racing another (two admins, a double click, a
    retried request) meets PostgreSQL's unique constraint. accounts_create
    catches only Conflict, so the IntegrityError reaches the error middleware,
    which logs it with its traceback (server/api/errors.py, "unhandled
    error"); PostgreSQL's DETAIL line quotes the address, and the masking's
    e-mail pattern (server/process_log.py, _EMAIL) covers only [\\w.+'%-] in a
    local part: everything before the "/" stays in the log."""
    stream = _process_log()
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    engine = harness.app[DB_ENGINE]
    other_admin = await engine.connect()
    try:
        racing = await other_admin.begin()
        await other_admin.execute(
            accounts.insert().values(
                id=uuid.uuid4(),
                organisation_id=admin.organisation.id,
                email=ADDRESS_WITH_SLASH,
                role=Role.THERAPIST.value,
                created_at=harness.clock.now(),
            )
        )
        request = asyncio.create_task(
            harness.post("/api/admin/accounts", {"email": ADDRESS_WITH_SLASH, "role": "therapist"})
        )
        # Until the request's insert waits for the other one's row lock (each
        # look in a transaction of its own: pg_stat_activity is a snapshot
        # taken once per transaction).
        waiting = 0
        for _ in range(1200):
            async with engine.connect() as probe:
                waiting = await probe.scalar(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            if waiting or request.done():
                break
            await asyncio.sleep(0.025)
        assert waiting, "the request's insert never waited for the other's: " + (
            repr(await (await request).text()) if request.done() else "still running"
        )
        await racing.commit()
        response = await request
    finally:
        await other_admin.close()
    # (409 "conflict" would be the answer; the race gets a 500.)
    # The second insert hits the unique constraint: 409, as when it was added before.
    assert response.status == 409, await response.text()
    logged = stream.getvalue()
    at = logged.find("j.de.vries")
    assert at == -1, (
        "part of a professional's e-mail address reached the process log: ..."
        + logged[max(0, at - 120) : at + 60]
    )


@pytest.mark.settings(logging_technical_log_max_rows="1000")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_failed_logins_do_not_grow_the_technical_log_past_its_most_rows(
    harness: Harness,
) -> None:
    """logging.technical_log_max_rows is "the most entries the technical log
    holds; beyond it new entries are dropped" (docs/configuration.md). The
    sink (audit/technical_log.py, TechnicalLog) keeps to it, but the login
    checks write their entries past it (server/auth/login.py: write_technical
    for login.failed, password.failed and login.locked, each with the
    client's address): anyone, without an account, adds rows to a full
    table, one per attempt."""
    engine = harness.app[DB_ENGINE]
    at = harness.clock.now()
    async with engine.begin() as conn:
        await conn.execute(
            technical_log.insert(),
            [
                {"at": at, "kind": "filler", "subject": None, "detail": {"n": n}}
                for n in range(1000)
            ],
        )
    for attempt in range(3):
        refused = await harness.post(
            "/api/login",
            {"email": f"nobody{attempt}@example.nl", "password": "guess", "code": "000000"},
        )
        assert refused.status == 401, await refused.text()
    sink = harness.app[TECHNICAL_LOG]
    sink.recount()  # the rows above were put in behind its back
    await sink.flush(engine)
    async with engine.connect() as conn:
        rows = await conn.scalar(sa.select(sa.func.count()).select_from(technical_log))
    assert sink.dropped[DropReason.STORE_FULL] == 3
    assert rows is not None
    assert rows <= 1000, (
        f"the technical log holds {rows} entries; logging.technical_log_max_rows is 1000"
    )


async def test_a_sockets_offered_subprotocols_stay_out_of_the_process_log(
    harness: Harness,
) -> None:
    """A client may offer WebSocket subprotocols (``Sec-WebSocket-Protocol``),
    whatever text it likes. The server speaks none, and aiohttp warned of
    every offer with the client's address and the offer as sent
    (aiohttp/web_ws.py, "don't overlap"): text only the masking's patterns
    stood between and the process log, where a name passes them."""
    stream = _process_log()
    setup = await new_consult(harness)
    sockets = Sockets(harness)
    try:
        ticket = await sockets.ticket(setup.invite_token)
        session = await sockets.session()
        offered = "jan.de.vries"
        socket = await session.ws_connect(
            f"/ws?ticket={ticket}", headers=harness.headers, protocols=(offered,)
        )
        # The socket works as without the offer; no subprotocol is chosen.
        assert (await receive(socket, "welcome"))["type"] == "welcome"
        assert socket.protocol is None
        await socket.close()
    finally:
        await sockets.close()
    logged = stream.getvalue()
    assert offered not in logged
    # Still said, without the client's values.
    assert "subprotocol" in logged


async def test_a_locked_login_names_the_account_it_was_for(harness: Harness) -> None:
    """``login.locked`` is written with the client's address, for the
    technical log's 24 hours, but it had no subject, where ``login.failed``
    names the account. An account holder's data export did not hold it, and
    an erasure, which finds the technical log's entries by the account's id
    (audit/subject_rights.py), left it behind until its 24 hours ran out."""
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    wrong = {"email": anna.email, "password": "wrong password!!", "code": "123456"}
    for _ in range(5):
        assert (await harness.post("/api/login", wrong)).status == 401
        harness.clock.advance(10)
    assert (await harness.login(anna)).status == 429
    engine = harness.app[DB_ENGINE]
    await harness.app[TECHNICAL_LOG].flush(engine)
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(technical_log.c.subject).where(technical_log.c.kind == "login.locked")
            )
        ).all()
    assert [row.subject for row in rows] == [str(anna.account_id)]
