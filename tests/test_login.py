"""Enrolment and login: password and TOTP code on every login, lockouts, sessions."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pyotp
import pytest
import sqlalchemy as sa
import structlog

from audit.accounts import Role
from audit.schema import accounts, login_failures, sessions, technical_log
from server.app_keys import DB_ENGINE, TECHNICAL_LOG
from server.process_log import configure_process_logging
from tests.support.harness import PASSWORD, Harness

REFUSED = {
    "error": {
        "code": "login_failed",
        "message": "The e-mail address, password or code is not right.",
    }
}


async def test_enrolment_end_to_end_then_login(harness: Harness) -> None:
    token = await harness.invite("anna@praktijk-noord.example", Role.THERAPIST)

    status = await harness.client.get(f"/api/enrolment/{token}")
    assert status.status == 200
    assert (await status.json())["email"] == "anna@praktijk-noord.example"

    chosen = await harness.post(f"/api/enrolment/{token}/password", {"password": PASSWORD})
    assert chosen.status == 200
    setup = await chosen.json()
    assert setup["provisioning_uri"].startswith("otpauth://totp/")
    assert setup["qr_code"].startswith("data:image/svg+xml")
    secret = setup["totp_secret"]
    assert pyotp.parse_uri(setup["provisioning_uri"]).secret == secret

    # Not active before a code confirms the app.
    early = await harness.post(
        "/api/login",
        {
            "email": "anna@praktijk-noord.example",
            "password": PASSWORD,
            "code": harness.code(secret),
        },
    )
    assert early.status == 401

    harness.clock.advance(30)
    wrong = await harness.post(f"/api/enrolment/{token}/confirm", {"code": "000000"})
    assert wrong.status == 422
    confirmed = await harness.post(
        f"/api/enrolment/{token}/confirm", {"code": harness.code(secret)}
    )
    assert confirmed.status == 200
    assert (await confirmed.json())["account"]["status"] == "active"

    # The link is used up, and the secret is never shown again.
    assert (await harness.client.get(f"/api/enrolment/{token}")).status == 404
    again = await harness.post(f"/api/enrolment/{token}/password", {"password": PASSWORD})
    assert again.status == 404

    harness.clock.advance(30)
    login = await harness.post(
        "/api/login",
        {
            "email": "Anna@Praktijk-Noord.example",
            "password": PASSWORD,
            "code": harness.code(secret),
        },
    )
    assert login.status == 200
    body = await login.json()
    assert body["account"]["role"] == "therapist"
    assert secret not in json.dumps(body)
    session = await harness.client.get("/api/session")
    assert session.status == 200
    assert secret not in await session.text()


async def test_totp_secret_is_stored_encrypted(harness: Harness) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    async with harness.app[DB_ENGINE].connect() as conn:
        row = (await conn.execute(sa.select(accounts))).one()
    assert row.totp_secret_sealed is not None
    assert anna.secret.encode() not in row.totp_secret_sealed
    assert row.password_hash.startswith("$argon2id$")


async def test_wrong_password_and_wrong_code_and_unknown_address_answer_alike(
    harness: Harness,
) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    attempts = [
        {"email": anna.email, "password": "not the password!", "code": harness.code(anna.secret)},
        {"email": anna.email, "password": PASSWORD, "code": "123456"},
        {"email": "nobody@praktijk-noord.example", "password": PASSWORD, "code": "123456"},
    ]
    for attempt in attempts:
        response = await harness.post("/api/login", attempt)
        assert response.status == 401
        assert await response.json() == REFUSED
        assert "Set-Cookie" not in response.headers


async def test_replayed_code_is_refused_and_the_next_code_works(harness: Harness) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    code = harness.code(anna.secret)
    assert (await harness.login(anna, code=code)).status == 200
    replay = await harness.login(anna, code=code)
    assert replay.status == 401
    assert await replay.json() == REFUSED
    harness.clock.advance(30)
    assert (await harness.login(anna)).status == 200


async def test_code_from_one_step_before_or_after_is_accepted(harness: Harness) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    totp = pyotp.TOTP(anna.secret)
    harness.clock.advance(90)  # past the step that enrolment used up
    behind = totp.at(harness.clock.now(), counter_offset=-1)
    assert (await harness.login(anna, code=behind)).status == 200
    harness.clock.advance(90)
    ahead = totp.at(harness.clock.now(), counter_offset=1)
    assert (await harness.login(anna, code=ahead)).status == 200
    harness.clock.advance(90)
    too_far = totp.at(harness.clock.now(), counter_offset=2)
    assert (await harness.login(anna, code=too_far)).status == 401


async def test_five_failures_lock_the_address_until_the_lockout_ends(harness: Harness) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    wrong = {"email": anna.email, "password": "wrong password!!", "code": "123456"}
    for _ in range(5):
        assert (await harness.post("/api/login", wrong)).status == 401
        harness.clock.advance(10)

    locked = await harness.login(anna)
    assert locked.status == 429
    assert (await locked.json())["error"]["code"] == "login_locked"
    retry_after = int(locked.headers["Retry-After"])
    assert 0 < retry_after <= 900

    harness.clock.advance(retry_after - 5)
    assert (await harness.login(anna)).status == 429
    harness.clock.advance(10)
    assert (await harness.login(anna)).status == 200


async def test_unknown_address_locks_exactly_like_a_known_one(harness: Harness) -> None:
    wrong = {"email": "nobody@praktijk-noord.example", "password": "wrong password!!"}
    statuses = []
    for _ in range(6):
        response = await harness.post("/api/login", {**wrong, "code": "123456"})
        statuses.append(response.status)
    assert statuses == [401] * 5 + [429]


async def test_failures_are_counted_per_client_address_too(
    make_settings, clock, aiohttp_client
) -> None:
    from server import create_app

    app = create_app(make_settings(accounts_client_max_failures=3), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    for number in range(3):
        attempt = {"email": f"guess{number}@example.org", "password": "x" * 12, "code": "123456"}
        assert (await harness.post("/api/login", attempt)).status == 401
    # The same client is now refused even for a different, correct account.
    assert (await harness.login(anna)).status == 429


async def test_failures_go_to_the_technical_log_and_never_to_the_process_log(
    harness: Harness,
) -> None:
    stream = io.StringIO()
    configure_process_logging(level="debug", log_format="json", stream=stream)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.post(
        "/api/login", {"email": anna.email, "password": "wrong password!!", "code": "654321"}
    )
    structlog.reset_defaults()

    process_log = stream.getvalue()
    for personal in (anna.email, "654321", "127.0.0.1", "wrong password!!", anna.secret):
        assert personal not in process_log
    # Through the technical log's sink, as every entry (its next round writes it).
    await harness.app[TECHNICAL_LOG].flush(harness.app[DB_ENGINE])
    async with harness.app[DB_ENGINE].connect() as conn:
        entries = (await conn.execute(sa.select(technical_log))).all()
        failures = (await conn.execute(sa.select(login_failures))).all()
    [entry] = entries
    assert entry.kind == "login.failed"
    assert entry.subject == str(anna.account_id)
    assert entry.detail == {"reason": "wrong password", "client_address": "127.0.0.1"}
    assert anna.email not in json.dumps(entry.detail)
    [failure] = failures
    assert anna.email not in failure.subject_hash
    assert "127.0.0.1" not in failure.client_hash


async def test_session_ends_after_idle_timeout(harness: Harness) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(anna)
    harness.clock.advance(14 * 60)
    assert (await harness.client.get("/api/session")).status == 200  # activity resets idle
    harness.clock.advance(14 * 60)
    assert (await harness.client.get("/api/session")).status == 200
    harness.clock.advance(15 * 60 + 1)
    assert (await harness.client.get("/api/session")).status == 401


async def test_a_session_in_use_is_marked_seen_once_a_minute_and_ends_by_that_mark(
    harness: Harness,
) -> None:
    # Issue 19: the session check of every request wrote the session's
    # last-seen time, so a read took SQLite's write lock (and a PostgreSQL
    # commit) for it. Now a request writes it only a minute after the last
    # mark; the idle timeout counts from the mark, so it ends early, never late.
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(anna)

    async def last_seen() -> datetime:
        async with harness.app[DB_ENGINE].connect() as conn:
            seen = await conn.scalar(
                sa.select(sessions.c.last_seen_at).where(sessions.c.account_id == anna.account_id)
            )
        assert seen is not None
        return seen.replace(tzinfo=UTC) if seen.tzinfo is None else seen

    async def ends_at() -> datetime:
        answer = await harness.client.get("/api/session")
        assert answer.status == 200, await answer.text()
        return datetime.fromisoformat((await answer.json())["session"]["ends_at"])

    # The pages' keep-alive marks it every time.
    touched = await harness.client.post("/api/session/touch", headers=harness.headers)
    assert touched.status == 204
    marked = await last_seen()
    assert marked == harness.clock.now()
    harness.clock.advance(59)
    assert await ends_at() == marked + timedelta(minutes=15)
    assert await last_seen() == marked  # not written again within the minute
    harness.clock.advance(1)
    now = harness.clock.now()
    assert await ends_at() == now + timedelta(minutes=15)
    assert await last_seen() == now
    harness.clock.advance(10)
    touched = await harness.client.post("/api/session/touch", headers=harness.headers)
    assert touched.status == 204
    assert await last_seen() == harness.clock.now()
    # Idle from that mark: 14:59 later the session holds (and is marked again)...
    harness.clock.advance(14 * 60 + 59)
    assert (await harness.client.get("/api/session")).status == 200
    # ...a request 30 s on leaves no mark (under a minute since the last)...
    harness.clock.advance(30)
    assert (await harness.client.get("/api/session")).status == 200
    # ...so 15 minutes after the mark, 14:30 after that request, it has ended.
    harness.clock.advance(15 * 60 - 30)
    assert (await harness.client.get("/api/session")).status == 401


async def test_a_touch_keeps_the_session_alive_and_reads_nothing(
    sqlite_harness: Harness,
) -> None:
    from audit.schema import access_log

    harness = sqlite_harness
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(anna)

    async def records() -> int:
        async with harness.app[DB_ENGINE].connect() as conn:
            return int(await conn.scalar(sa.select(sa.func.count()).select_from(access_log)) or 0)

    before = await records()
    for _ in range(3):
        harness.clock.advance(14 * 60)
        touched = await harness.client.post("/api/session/touch", headers=harness.headers)
        assert touched.status == 204
        assert await touched.read() == b""
    assert await records() == before  # it returns no personal data, so no read is logged
    # Without a valid Origin it is refused like every other POST.
    assert (await harness.client.post("/api/session/touch")).status == 403
    harness.clock.advance(15 * 60 + 1)
    expired = await harness.client.post("/api/session/touch", headers=harness.headers)
    assert expired.status == 401
    assert (await expired.json())["error"]["code"] == "not_logged_in"


async def test_session_ends_after_absolute_timeout_despite_activity(harness: Harness) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(anna)  # logs in, then the harness moves on 30 s
    for _ in range(71):  # a request every 10 minutes: 11 h 50 min 30 s after login
        harness.clock.advance(600)
        assert (await harness.client.get("/api/session")).status == 200
    harness.clock.advance(9 * 60)  # 11 h 59 min 30 s: still inside the 12 hours
    assert (await harness.client.get("/api/session")).status == 200
    harness.clock.advance(31)  # 12 h and 1 s
    response = await harness.client.get("/api/session")
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "not_logged_in"


async def test_logout_destroys_the_session_on_the_server(harness: Harness) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    response = await harness.login(anna)
    cookie = response.cookies["vc_session"].value
    logout = await harness.post("/api/logout")
    assert logout.status == 204
    # Replaying the old cookie does not bring the session back.
    assert (await harness.session_with_cookie(cookie)).status == 401


async def test_login_rotates_the_session_id(harness: Harness) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    first = (await harness.login(anna)).cookies["vc_session"].value
    harness.clock.advance(30)
    second = (await harness.login(anna)).cookies["vc_session"].value
    assert first != second
    assert (await harness.session_with_cookie(first)).status == 401
    assert (await harness.session_with_cookie(second)).status == 200


async def test_session_cookie_is_httponly_and_strict(sqlite_harness: Harness) -> None:
    anna = await sqlite_harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    response = await sqlite_harness.login(anna)
    morsel = response.cookies["vc_session"]
    assert morsel["httponly"]
    assert morsel["samesite"] == "Strict"
    assert morsel["path"] == "/"
    assert not morsel["secure"]  # plain HTTP on localhost in development


async def test_disabled_account_cannot_log_in(harness: Harness) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(admin)
    disabled = await harness.post(f"/api/admin/accounts/{anna.account_id}/disable")
    assert disabled.status == 200
    await harness.post("/api/logout")
    response = await harness.login(anna)
    assert response.status == 401
    assert await response.json() == REFUSED


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"email": "a@b.nl", "password": "x" * 12}, 422, "field 'code' is required"),
        ({"email": "a@b.nl", "password": "x" * 12, "code": "12345"}, 422, "field 'code'"),
        ({"email": "a@b.nl", "password": "x" * 12, "code": "1234567"}, 422, "field 'code'"),
        ({"email": "a@b.nl", "password": "x" * 12, "code": "12a456"}, 422, "field 'code'"),
        ({"email": "a@b.nl", "password": "x" * 12, "code": 123456}, 422, "field 'code'"),
        ({"email": ["a@b.nl"], "password": "x", "code": "123456"}, 422, "field 'email'"),
        ({"email": "a@b.nl", "password": "x" * 2000, "code": "123456"}, 422, "field 'password'"),
        (
            {"email": "a@b.nl", "password": "x" * 12, "code": "123456", "admin": True},
            422,
            "field 'admin' is not expected",
        ),
    ],
)
async def test_malformed_login_bodies_get_a_clear_error_and_change_nothing(
    sqlite_harness: Harness, body: dict[str, object], status: int, fragment: str
) -> None:
    response = await sqlite_harness.post("/api/login", body)
    assert response.status == status
    error = (await response.json())["error"]
    assert fragment in error["message"]
    async with sqlite_harness.app[DB_ENGINE].connect() as conn:
        assert (await conn.execute(sa.select(login_failures))).all() == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"email": "a@b.nl", "password": "xxxxxxxxxxxx", "code": ' + b"1" * 5000 + b"}",
        b"[" * 20000,
        b'{"email": ' + b"[" * 20000 + b"}",
        # Found in review: Python reads these, but they are no JSON.
        b'{"email": "a@b.nl", "password": "xxxxxxxxxxxx", "code": NaN}',
        b'{"email": "a@b.nl", "password": "xxxxxxxxxxxx", "code": -Infinity}',
    ],
)
async def test_pathological_json_is_refused_with_400(sqlite_harness: Harness, raw: bytes) -> None:
    response = await sqlite_harness.post(
        "/api/login", data=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "malformed_json"


@pytest.mark.parametrize(
    "body",
    [
        {"email": "anna@example.nl\u0000", "password": "x" * 12, "code": "123456"},
        {"email": "anna@example.nl", "password": "pass\u0000word1234", "code": "123456"},
    ],
)
async def test_control_characters_are_refused_before_any_lookup(
    harness: Harness, body: dict[str, str]
) -> None:
    body = {key: value.encode().decode("unicode_escape") for key, value in body.items()}
    response = await harness.post("/api/login", body)
    assert response.status == 422
    assert "control characters (U+0000)" in (await response.json())["error"]["message"]


async def test_invalid_json_and_huge_bodies_are_refused(sqlite_harness: Harness) -> None:
    not_json = await sqlite_harness.post(
        "/api/login", data=b"{email:", headers={"Content-Type": "application/json"}
    )
    assert not_json.status == 400
    assert (await not_json.json())["error"]["code"] == "malformed_json"
    not_object = await sqlite_harness.post("/api/login", [1, 2])
    assert not_object.status == 400
    form = await sqlite_harness.post("/api/login", data={"email": "a@b.nl"})
    assert form.status == 400
    huge = await sqlite_harness.post(
        "/api/login",
        data=b'{"email": "' + b"a" * 100_000 + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert huge.status == 413
    assert (await huge.json())["error"]["code"] == "payload_too_large"


async def test_unknown_address_takes_as_long_as_a_wrong_password(
    make_settings, clock, aiohttp_client
) -> None:
    """With production argon2 costs the dummy hash makes both paths slow alike.

    Without it an unknown address answers in about a millisecond and a known
    one in tens of milliseconds, so the bound below is far from both.
    """
    import time

    from server import create_app

    settings = make_settings(
        accounts_argon2_time_cost=3, accounts_argon2_memory_kib=65536, accounts_argon2_parallelism=4
    )
    app = create_app(settings, clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)

    async def timed(email: str) -> float:
        started = time.perf_counter()
        response = await harness.post(
            "/api/login", {"email": email, "password": "wrong password!!", "code": "123456"}
        )
        assert response.status == 401
        return time.perf_counter() - started

    known = sorted([await timed(anna.email) for _ in range(3)])[1]
    unknown = sorted([await timed(f"nobody{n}@example.nl") for n in range(3)])[1]
    assert unknown > known * 0.5, (known, unknown)
    assert known > 0.01  # the production costs really are in force


async def test_a_burst_of_parallel_wrong_logins_is_locked_after_five(harness: Harness) -> None:
    import asyncio

    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    wrong = {"email": anna.email, "password": "wrong password!!", "code": "123456"}
    responses = await asyncio.gather(*(harness.post("/api/login", wrong) for _ in range(20)))
    statuses = sorted(response.status for response in responses)
    # Each attempt is counted before it is checked, so the burst cannot slip
    # through while the slow password checks run.
    assert statuses == [401] * 5 + [429] * 15
    assert (await harness.login(anna)).status == 429


async def test_logout_over_tls_clears_the_host_cookie_properly(
    make_settings, clock, aiohttp_client
) -> None:
    from server import create_app

    public = "https://video.praktijk-noord.example"
    app = create_app(make_settings(server_public_url=public), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    harness.origin = public
    response = await harness.post("/api/logout")
    assert response.status == 204
    cleared = response.cookies["__Host-vc_session"]
    assert cleared["secure"]  # browsers ignore a __Host- cookie without it
    assert cleared["max-age"] == "0"


async def test_client_address_comes_from_a_trusted_proxy_only(
    make_settings, clock, aiohttp_client
) -> None:
    from server import create_app

    app = create_app(make_settings(server_trusted_proxies="127.0.0.1"), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    wrong = {"email": "x@praktijk-noord.example", "password": "wrong password!!", "code": "1" * 6}
    for forwarded in ("203.0.113.9", "198.51.100.7, 203.0.113.10"):
        await harness.post("/api/login", wrong, headers={"X-Forwarded-For": forwarded})
    await app[TECHNICAL_LOG].flush(app[DB_ENGINE])
    async with app[DB_ENGINE].connect() as conn:
        addresses = [
            row.detail["client_address"]
            for row in await conn.execute(sa.select(technical_log).order_by(technical_log.c.id))
        ]
    # The nearest untrusted hop is the client; what lies before it is hearsay.
    assert addresses == ["203.0.113.9", "203.0.113.10"]


async def test_forwarded_header_from_an_untrusted_peer_is_ignored(harness: Harness) -> None:
    wrong = {"email": "x@praktijk-noord.example", "password": "wrong password!!", "code": "1" * 6}
    await harness.post("/api/login", wrong, headers={"X-Forwarded-For": "203.0.113.9"})
    await harness.app[TECHNICAL_LOG].flush(harness.app[DB_ENGINE])
    async with harness.app[DB_ENGINE].connect() as conn:
        [row] = (await conn.execute(sa.select(technical_log))).all()
    assert row.detail["client_address"] == "127.0.0.1"


async def test_clients_behind_one_trusted_proxy_do_not_lock_each_other_out(
    make_settings, clock, aiohttp_client
) -> None:
    from server import create_app

    app = create_app(
        make_settings(server_trusted_proxies="127.0.0.1", accounts_client_max_failures=3),
        clock=clock,
    )
    harness = Harness(app, await aiohttp_client(app), clock)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    for number in range(3):
        attempt = {"email": f"guess{number}@example.org", "password": "x" * 12, "code": "123456"}
        headers = {"X-Forwarded-For": "203.0.113.66"}
        assert (await harness.post("/api/login", attempt, headers=headers)).status == 401
    body = {"email": anna.email, "password": anna.password, "code": harness.code(anna.secret)}
    elsewhere = await harness.post("/api/login", body, headers={"X-Forwarded-For": "198.51.100.5"})
    assert elsewhere.status == 200
