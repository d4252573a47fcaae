"""Account administration: admins only, own organisation only, every change logged."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest
import sqlalchemy as sa

from audit.access_log import Actor
from audit.accounts import Role, find_account_by_email
from audit.schema import access_log, sessions
from server.app_keys import DATA_DIR, DB_ENGINE, SETTINGS
from server.auth.admin import reset_account_totp
from tests.support.cli import cli_env, run_cli
from tests.support.harness import Harness

ADMIN_ROUTES = [
    ("GET", "/api/admin/accounts"),
    ("POST", "/api/admin/accounts"),
    ("GET", "/api/admin/accounts/{id}"),
    ("PATCH", "/api/admin/accounts/{id}"),
    ("POST", "/api/admin/accounts/{id}/disable"),
    ("POST", "/api/admin/accounts/{id}/enable"),
    ("POST", "/api/admin/accounts/{id}/reset-totp"),
]


async def call(harness: Harness, method: str, path: str, body: object = None):
    return await harness.client.request(method, path, json=body, headers=harness.headers)


async def access_records(harness: Harness) -> list[sa.Row[tuple[object, ...]]]:
    async with harness.app[DB_ENGINE].connect() as conn:
        return list(await conn.execute(sa.select(access_log).order_by(access_log.c.id)))


@pytest.mark.parametrize(("method", "template"), ADMIN_ROUTES)
async def test_admin_routes_refuse_anonymous_callers(
    sqlite_harness: Harness, method: str, template: str
) -> None:
    response = await call(sqlite_harness, method, template.format(id=uuid.uuid4()), {})
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "not_logged_in"


@pytest.mark.parametrize("role", [Role.THERAPIST, Role.SUPPORT])
@pytest.mark.parametrize(("method", "template"), ADMIN_ROUTES)
async def test_admin_routes_refuse_therapists_and_support_and_log_it(
    sqlite_harness: Harness, role: Role, method: str, template: str
) -> None:
    someone = await sqlite_harness.professional("someone@praktijk-noord.example", role)
    await sqlite_harness.logged_in(someone)
    target = template.format(id=someone.account_id)
    response = await call(sqlite_harness, method, target, {"role": "admin"})
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "forbidden"
    [record] = [r for r in await access_records(sqlite_harness) if r.outcome == "refused"]
    assert record.actor_id == someone.account_id
    assert record.actor_role == role.value
    # Nothing changed: still the same role.
    async with sqlite_harness.app[DB_ENGINE].connect() as conn:
        from audit.accounts import get_account

        assert (await get_account(conn, someone.account_id)).role is role


async def test_admin_creates_an_account_that_enrols_through_its_link(harness: Harness) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    created = await harness.post(
        "/api/admin/accounts", {"email": "Bram@Praktijk-Noord.example", "role": "therapist"}
    )
    assert created.status == 201
    body = await created.json()
    assert body["account"]["email"] == "bram@praktijk-noord.example"
    assert body["account"]["status"] == "enrolling"
    assert body["enrolment_url"].endswith(f"/enrol/{body['enrolment_token']}")
    await harness.post("/api/logout")
    secret = await harness.enrol(body["enrolment_token"])
    bram = await harness.post(
        "/api/login",
        {
            "email": "bram@praktijk-noord.example",
            "password": "correct horse battery staple",
            "code": harness.code(secret),
        },
    )
    assert bram.status == 200


async def test_taken_email_and_unknown_role_are_refused(harness: Harness) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    taken = await harness.post("/api/admin/accounts", {"email": admin.email, "role": "support"})
    assert taken.status == 409
    role = await harness.post(
        "/api/admin/accounts", {"email": "x@praktijk-noord.example", "role": "superuser"}
    )
    assert role.status == 422
    assert "unknown role 'superuser'" in (await role.json())["error"]["message"]


@pytest.mark.parametrize(
    ("email", "fragment"),
    [
        ("\u0430nna@praktijk-noord.example", "U+0430"),  # Cyrillic a
        ("an\u200bna@praktijk-noord.example", "U+200B"),  # zero-width space
        ("anna@praktijk\u202enoord.example", "U+202E"),  # right-to-left override
        ("anna@ex\u0430mple.nl", "U+0430"),
        ("anna at example.nl", "not valid"),
        ("", "empty"),
        ("a" * 250 + "@example.nl", "longer than 254"),
    ],
)
async def test_unicode_tricks_and_malformed_addresses_are_refused(
    sqlite_harness: Harness, email: str, fragment: str
) -> None:
    admin = await sqlite_harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await sqlite_harness.logged_in(admin)
    response = await sqlite_harness.post("/api/admin/accounts", {"email": email, "role": "support"})
    assert response.status == 422
    assert fragment in (await response.json())["error"]["message"]
    listing = await (await sqlite_harness.client.get("/api/admin/accounts")).json()
    assert len(listing["accounts"]) == 1


async def test_admins_never_see_or_touch_another_organisation(harness: Harness) -> None:
    north_admin = await harness.professional("admin@noord.example", Role.ADMIN, "Praktijk Noord")
    south_admin = await harness.professional("admin@zuid.example", Role.ADMIN, "Praktijk Zuid")
    south_therapist = await harness.professional(
        "therapist@zuid.example", Role.THERAPIST, "Praktijk Zuid"
    )
    await harness.logged_in(north_admin)
    listing = await (await harness.client.get("/api/admin/accounts")).json()
    assert [account["email"] for account in listing["accounts"]] == ["admin@noord.example"]
    for method, template in ADMIN_ROUTES[2:]:
        for victim in (south_admin, south_therapist):
            response = await call(
                harness, method, template.format(id=victim.account_id), {"role": "admin"}
            )
            assert response.status == 404, (method, template)
    # The other organisation is untouched, and its people can still log in.
    await harness.post("/api/logout")
    assert (await harness.login(south_therapist)).status == 200


async def test_disabling_an_account_ends_its_sessions_at_once(harness: Harness) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    anna_cookie = (await harness.login(anna)).cookies["vc_session"].value
    harness.clock.advance(30)
    harness.client.session.cookie_jar.clear()
    await harness.logged_in(admin)
    disabled = await harness.post(f"/api/admin/accounts/{anna.account_id}/disable")
    assert disabled.status == 200
    assert (await disabled.json())["account"]["status"] == "disabled"
    assert (await harness.session_with_cookie(anna_cookie)).status == 401
    async with harness.app[DB_ENGINE].connect() as conn:
        left = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(sessions)
            .where(sessions.c.account_id == anna.account_id)
        )
    assert left == 0


async def test_enabling_lets_a_disabled_account_log_in_again(harness: Harness) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(admin)
    await harness.post(f"/api/admin/accounts/{anna.account_id}/disable")
    enabled = await harness.post(f"/api/admin/accounts/{anna.account_id}/enable")
    assert (await enabled.json())["account"]["status"] == "active"
    await harness.post("/api/logout")
    assert (await harness.login(anna)).status == 200


async def test_reset_totp_forces_a_new_enrolment(harness: Harness) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    anna_cookie = (await harness.login(anna)).cookies["vc_session"].value
    harness.clock.advance(30)
    harness.client.session.cookie_jar.clear()
    await harness.logged_in(admin)
    reset = await harness.post(f"/api/admin/accounts/{anna.account_id}/reset-totp")
    assert reset.status == 200
    body = await reset.json()
    assert body["account"]["status"] == "enrolling"
    assert (await harness.session_with_cookie(anna_cookie)).status == 401  # ended at once
    harness.client.session.cookie_jar.clear()
    assert (await harness.login(anna)).status == 401  # the old app's codes are worthless
    new_secret = await harness.enrol(body["enrolment_token"])
    assert new_secret != anna.secret
    anna.secret = new_secret
    assert (await harness.login(anna)).status == 200


async def test_an_admin_who_resets_a_totp_cannot_become_that_therapist(harness: Harness) -> None:
    """Issue 17, finding 3: the reset link used to set a new password as well,
    so the admin who got it could enrol, log in as the therapist and read
    their recordings. The reset keeps the password, and the link needs it."""
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(admin)
    reset = await harness.post(f"/api/admin/accounts/{anna.account_id}/reset-totp")
    token = (await reset.json())["enrolment_token"]
    status = await (await harness.client.get(f"/api/enrolment/{token}")).json()
    assert status["keeps_password"] is True

    # The admin's own choice of password is refused: it is not Anna's.
    harness.client.session.cookie_jar.clear()
    chosen = await harness.post(
        f"/api/enrolment/{token}/password", {"password": "the admin's choice 12345"}
    )
    assert chosen.status == 422, await chosen.text()
    error = (await chosen.json())["error"]
    assert "current password" in error["message"]
    assert "totp_secret" not in await chosen.text()
    # Guessing counts like failed logins: after the limit the link locks too.
    for _ in range(harness.app[SETTINGS].accounts.max_failures):
        await harness.post(f"/api/enrolment/{token}/password", {"password": "guess 1234567890"})
    locked = await harness.post(f"/api/enrolment/{token}/password", {"password": anna.password})
    assert locked.status == 429

    # Anna, once the lock has passed, re-enrols with her own password, which stays.
    harness.clock.advance(harness.app[SETTINGS].accounts.lockout_s + 1)
    anna.secret = await harness.enrol(token, password=anna.password)
    assert (await harness.login(anna)).status == 200


async def test_the_last_active_admin_cannot_be_disabled_demoted_or_reset(
    harness: Harness,
) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    base = f"/api/admin/accounts/{admin.account_id}"
    for response in (
        await harness.post(f"{base}/disable"),
        await harness.post(f"{base}/reset-totp"),
        await harness.patch(base, {"role": "therapist"}),
    ):
        assert response.status == 409
        assert "last active admin" in (await response.json())["error"]["message"]
    second = await harness.professional("second@praktijk-noord.example", Role.ADMIN)
    demoted = await harness.patch(f"/api/admin/accounts/{second.account_id}", {"role": "support"})
    assert (await demoted.json())["account"]["role"] == "support"


async def test_every_admin_change_and_read_is_in_the_access_log(harness: Harness) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(admin)
    await harness.client.get("/api/admin/accounts")
    await harness.client.get(f"/api/admin/accounts/{anna.account_id}")
    await harness.patch(f"/api/admin/accounts/{anna.account_id}", {"role": "support"})
    await harness.post(f"/api/admin/accounts/{anna.account_id}/disable")
    await harness.post(f"/api/admin/accounts/{anna.account_id}/enable")
    await harness.post(f"/api/admin/accounts/{anna.account_id}/reset-totp")
    await harness.client.get(f"/api/admin/accounts/{uuid.uuid4()}")

    records = [r for r in await access_records(harness) if r.actor_id == admin.account_id]
    assert [(r.action, r.outcome) for r in records] == [
        ("session.login", "allowed"),
        ("account.list", "allowed"),
        ("account.read", "allowed"),
        ("account.set-role", "allowed"),
        ("account.disable", "allowed"),
        ("account.enable", "allowed"),
        ("account.reset-totp", "allowed"),
        ("account.read", "refused"),
    ]
    assert all(r.client_type == "api" and r.actor_role == "admin" for r in records)
    assert {r.object_id for r in records[2:7]} == {str(anna.account_id)}


async def test_malformed_account_ids_answer_404(sqlite_harness: Harness) -> None:
    admin = await sqlite_harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await sqlite_harness.logged_in(admin)
    response = await sqlite_harness.client.get("/api/admin/accounts/not-a-uuid")
    assert response.status == 404


async def test_two_admins_disabling_each_other_at_once_leave_one_active(
    harness: Harness,
) -> None:
    import asyncio

    from audit.access_log import Actor, ClientType
    from audit.accounts import get_account
    from server.auth.admin import AccountChange, change_account

    first = await harness.professional("first@praktijk-noord.example", Role.ADMIN)
    second = await harness.professional("second@praktijk-noord.example", Role.ADMIN)
    engine = harness.app[DB_ENGINE]

    async def disable(target: uuid.UUID, actor: uuid.UUID) -> str:
        try:
            async with engine.begin() as conn:
                account = await get_account(conn, target)
                await change_account(
                    conn,
                    Actor(actor, "admin", ClientType.API),
                    account,
                    AccountChange.DISABLE,
                    now=harness.clock.now(),
                )
        except Exception as err:  # the loser's refusal
            return type(err).__name__
        return "disabled"

    outcomes = await asyncio.gather(
        disable(second.account_id, first.account_id),
        disable(first.account_id, second.account_id),
    )
    assert sorted(outcomes) == ["Conflict", "disabled"]
    async with engine.connect() as conn:
        states = [(await get_account(conn, who.account_id)).status.value for who in (first, second)]
    assert sorted(states) == ["active", "disabled"]


@pytest.mark.slow
async def test_the_console_resets_the_app_alone_or_the_password_too(
    sqlite_harness: Harness,
) -> None:
    """``user reset-totp`` keeps the password (its link asks for it); ``user
    reset`` forgets both, for the operator to hand its link to the holder."""
    harness = sqlite_harness
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    env = cli_env(harness.app[DATA_DIR])

    def link_token(*args: str) -> str:
        result = run_cli("user", *args, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.split("/enrol/")[1].split()[0]

    token = link_token("reset-totp", anna.email)
    status = await (await harness.client.get(f"/api/enrolment/{token}")).json()
    assert status["keeps_password"] is True
    refused = await harness.post(
        f"/api/enrolment/{token}/password", {"password": "a brand new password"}
    )
    assert refused.status == 422

    token = link_token("reset", anna.email)
    status = await (await harness.client.get(f"/api/enrolment/{token}")).json()
    assert status["keeps_password"] is False
    anna.password = "a brand new password"
    anna.secret = await harness.enrol(token, password=anna.password)
    assert (await harness.login(anna)).status == 200
    resets = [
        (r.action, r.client_type)
        for r in await access_records(harness)
        if r.object_id == str(anna.account_id) and r.action.startswith("account.reset")
    ]
    assert resets == [("account.reset-totp", "cli"), ("account.reset", "cli")]


async def test_after_the_consoles_full_reset_no_admin_can_issue_a_link_of_their_own(
    sqlite_harness: Harness,
) -> None:
    """A full reset leaves the account without a password: an app reset by an
    admin would then hand the admin a link that sets a new one, and with it
    the account. Only the console issues that account's link again."""
    harness = sqlite_harness
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    # What ``videoconsult user reset`` does, in this process (the command
    # itself: test_the_console_resets_the_app_alone_or_the_password_too).
    async with harness.app[DB_ENGINE].begin() as conn:
        account = await find_account_by_email(conn, anna.email)
        assert account is not None
        invitation = await reset_account_totp(
            conn,
            Actor.operator(),
            account,
            now=harness.clock.now(),
            link_ttl_s=harness.app[SETTINGS].accounts.enrolment_link_ttl_s,
            password_too=True,
        )
    operators_token = invitation.token

    await harness.logged_in(admin)
    refused = await harness.post(f"/api/admin/accounts/{anna.account_id}/reset-totp")
    assert refused.status == 409, await refused.text()
    error = (await refused.json())["error"]
    assert error["code"] == "reset_by_operator"
    assert "console" in error["message"]
    last = (await access_records(harness))[-1]
    assert (last.action, last.actor_id, last.object_id, last.outcome) == (
        "account.reset-totp",
        admin.account_id,
        str(anna.account_id),
        "refused",
    )
    # The operator's link still works, for the holder.
    status = await harness.client.get(f"/api/enrolment/{operators_token}")
    assert status.status == 200
    assert (await status.json())["keeps_password"] is False


async def test_the_account_holder_is_told_of_every_reset(harness: Harness) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    bram = await harness.professional("bram@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(admin)
    reset = await harness.post(f"/api/admin/accounts/{anna.account_id}/reset-totp")
    token = (await reset.json())["enrolment_token"]
    reset_at = harness.clock.now()
    harness.client.session.cookie_jar.clear()
    anna.secret = await harness.enrol(token, password=anna.password)

    login = await harness.login(anna)
    [notice] = (await login.json())["notices"]
    assert notice["kind"] == "totp-reset"
    assert datetime.fromisoformat(notice["at"]) == reset_at
    assert (notice["by_role"], notice["by_email"]) == ("admin", admin.email)
    # Until dismissed it is there at every look; only its holder can dismiss it.
    session = await (await harness.client.get("/api/session")).json()
    assert [n["id"] for n in session["notices"]] == [notice["id"]]
    dismiss = f"/api/session/notices/{notice['id']}/dismiss"
    harness.client.session.cookie_jar.clear()
    await harness.logged_in(bram)
    refused = await harness.post(dismiss)
    assert refused.status == 404
    assert (await refused.json())["error"]["code"] == "notice_not_found"
    harness.client.session.cookie_jar.clear()
    await harness.logged_in(anna)
    assert (await harness.post(dismiss)).status == 204
    assert (await (await harness.client.get("/api/session")).json())["notices"] == []
    assert (await harness.post(dismiss)).status == 404
    records = [(r.action, r.actor_id) for r in await access_records(harness)]
    assert ("notice.dismiss", anna.account_id) in records
