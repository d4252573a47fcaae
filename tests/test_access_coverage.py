"""Every route that returns personal data writes the access log.

The test walks the application's route table: each route must be listed
below, either with a request that returns personal data (and then an
access-log record with the named action must appear) or with the reason it
returns none. A new route fails this test until it is classified.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa

from audit.consults import mark_started
from audit.roles import Role
from audit.schema import access_log
from server.app_keys import DB_ENGINE
from tests.support.harness import PASSWORD, Harness, new_consult, stored_recording

Scenario = Callable[[Harness], Awaitable[Any]]

# Routes that return no personal data, and why.
NOT_PERSONAL = {
    ("GET", "/"): "a static page",
    ("GET", "/login"): "a static page",
    ("GET", "/app"): "a static page; its script asks the API",
    ("GET", "/join/{token}"): "a static page; its script asks the API",
    ("GET", "/enrol/{token}"): "a static page; its script asks the API",
    ("GET", "/support"): "a static page; its script asks the API",
    ("GET", "/admin"): "a static page; its script asks the API",
    ("GET", "/healthz"): "liveness only",
    ("GET", "/readyz"): "readiness only, a fixed vocabulary of reasons",
    ("GET", "/metrics"): "counts under fixed labels only (docs/metrics.md), no personal data",
    ("POST", "/api/logout"): "answers nothing",
    ("POST", "/api/session/touch"): "answers nothing (204)",
    ("GET", "/api/invites/{token}"): "whether the link works; nothing about anyone",
    ("POST", "/api/invites/{token}/ticket"): "a ticket; nothing about anyone",
    ("POST", "/api/invites/{token}/receipt"): "a receipt link for the invite's own consult",
    (
        "GET",
        "/receipt/{token}",
    ): "a static page (404 for an unknown receipt); its script asks the API",
    ("GET", "/ws"): "the signaling socket of the consult's own participants; "
    "each connection is noted in the 24-hour technical log; the therapist's label it "
    "shows is access-logged (consult.label.read, tests/test_waiting_label.py)",
}


async def _therapist(harness: Harness) -> Any:
    return await new_consult(harness)


async def _admin(harness: Harness) -> Any:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    target = await harness.professional("bram@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(admin)
    return target


async def login(h: Harness) -> Any:
    anna = await h.professional("anna@praktijk-noord.example", Role.THERAPIST)
    return await h.login(anna)


async def session(h: Harness) -> Any:
    await _therapist(h)
    return await h.client.get("/api/session")


async def enrolment_read(h: Harness) -> Any:
    token = await h.invite("new@praktijk-noord.example", Role.THERAPIST)
    return await h.client.get(f"/api/enrolment/{token}")


async def enrolment_password(h: Harness) -> Any:
    token = await h.invite("new@praktijk-noord.example", Role.THERAPIST)
    return await h.post(f"/api/enrolment/{token}/password", {"password": PASSWORD})


async def enrolment_confirm(h: Harness) -> Any:
    token = await h.invite("new@praktijk-noord.example", Role.THERAPIST)
    chosen = await (await h.post(f"/api/enrolment/{token}/password", {"password": PASSWORD})).json()
    return await h.post(f"/api/enrolment/{token}/confirm", {"code": h.code(chosen["totp_secret"])})


async def accounts_list(h: Harness) -> Any:
    await _admin(h)
    return await h.client.get("/api/admin/accounts")


async def accounts_create(h: Harness) -> Any:
    await _admin(h)
    return await h.post(
        "/api/admin/accounts", {"email": "c@praktijk-noord.example", "role": "support"}
    )


async def account_read(h: Harness) -> Any:
    target = await _admin(h)
    return await h.client.get(f"/api/admin/accounts/{target.account_id}")


async def account_patch(h: Harness) -> Any:
    target = await _admin(h)
    return await h.patch(f"/api/admin/accounts/{target.account_id}", {"role": "support"})


async def account_external_id(h: Harness) -> Any:
    target = await _admin(h)
    path = f"/api/admin/accounts/{target.account_id}/external-id"
    return await h.client.put(path, json={"external_id": "BIG-1234"}, headers=h.headers)


async def account_disable(h: Harness) -> Any:
    target = await _admin(h)
    return await h.post(f"/api/admin/accounts/{target.account_id}/disable")


async def account_enable(h: Harness) -> Any:
    target = await _admin(h)
    await h.post(f"/api/admin/accounts/{target.account_id}/disable")
    return await h.post(f"/api/admin/accounts/{target.account_id}/enable")


async def account_reset_totp(h: Harness) -> Any:
    target = await _admin(h)
    return await h.post(f"/api/admin/accounts/{target.account_id}/reset-totp")


async def notice_dismiss(h: Harness) -> Any:
    target = await _admin(h)
    reset = await h.post(f"/api/admin/accounts/{target.account_id}/reset-totp")
    target.secret = await h.enrol((await reset.json())["enrolment_token"], target.password)
    h.client.session.cookie_jar.clear()
    notice = (await (await h.login(target)).json())["notices"][0]
    return await h.post(f"/api/session/notices/{notice['id']}/dismiss")


async def access_log_read(h: Harness) -> Any:
    await _admin(h)
    return await h.client.get("/api/admin/access-log")


async def access_log_verify(h: Harness) -> Any:
    await _admin(h)
    return await h.client.get("/api/admin/access-log/verify")


async def consult_create(h: Harness) -> Any:
    await _therapist(h)
    return await h.post("/api/consults", {"display_name": "Mevr. J."})


async def consult_list(h: Harness) -> Any:
    await _therapist(h)
    return await h.client.get("/api/consults")


async def consult_read(h: Harness) -> Any:
    setup = await _therapist(h)
    return await h.client.get(f"/api/consults/{setup.consult_id}")


async def consult_end(h: Harness) -> Any:
    setup = await _therapist(h)
    return await h.post(f"/api/consults/{setup.consult_id}/end")


async def consult_reissue(h: Harness) -> Any:
    setup = await _therapist(h)
    return await h.post(f"/api/consults/{setup.consult_id}/invite")


async def consult_revoke(h: Harness) -> Any:
    setup = await _therapist(h)
    return await h.client.delete(f"/api/consults/{setup.consult_id}/invite", headers=h.headers)


async def account_export(h: Harness) -> Any:
    await _therapist(h)
    return await h.client.get("/api/account/export")


async def account_erase(h: Harness) -> Any:
    target = await _admin(h)
    return await h.post(f"/api/admin/accounts/{target.account_id}/erase")


async def _support(harness: Harness) -> Any:
    setup = await new_consult(harness)
    support = await harness.professional("sam@praktijk-noord.example", Role.SUPPORT)
    await harness.logged_in(support)
    return setup


async def support_consults(h: Harness) -> Any:
    await _support(h)
    return await h.client.get("/api/support/consults")


async def support_chart_days(h: Harness) -> Any:
    await _support(h)
    return await h.client.get("/api/support/charts/consults-per-day.svg")


async def support_chart_durations(h: Harness) -> Any:
    await _support(h)
    return await h.client.get("/api/support/charts/durations.svg")


async def support_technical_log(h: Harness) -> Any:
    setup = await _support(h)
    return await h.client.get(f"/api/support/consults/{setup.consult_id}/technical-log")


async def retention_read(h: Harness) -> Any:
    await _admin(h)
    return await h.client.get("/api/admin/retention")


async def retention_update(h: Harness) -> Any:
    await _admin(h)
    body = {"consult_days": 90, "recording_days": 7, "access_log_days": 3650}
    return await h.client.put("/api/admin/retention", json=body, headers=h.headers)


async def _recording(harness: Harness) -> Any:
    setup = await new_consult(harness)
    return await stored_recording(harness, setup.consult_id, b"matroska bytes")


async def recording_list(h: Harness) -> Any:
    await _recording(h)
    return await h.client.get("/api/recordings")


async def recording_download(h: Harness) -> Any:
    recording_id = await _recording(h)
    return await h.client.get(f"/api/recordings/{recording_id}/download")


async def recording_play(h: Harness) -> Any:
    recording_id = await _recording(h)
    return await h.client.get(
        f"/api/recordings/{recording_id}/media", headers={"Range": "bytes=0-"}
    )


async def recording_delete(h: Harness) -> Any:
    recording_id = await _recording(h)
    return await h.client.delete(f"/api/recordings/{recording_id}", headers=h.headers)


async def access_log_export(h: Harness) -> Any:
    await _admin(h)
    return await h.client.get("/api/admin/access-log/export", params={"format": "json"})


# A public address (webhooks reach no private network): the test sends nothing.
WEBHOOK_URL = "https://93.184.216.34/videoconsult-hooks"


async def webhook_create(h: Harness) -> Any:
    await _admin(h)
    return await h.post("/api/admin/webhooks", {"url": WEBHOOK_URL, "events": ["consult.ended"]})


async def webhook_list(h: Harness) -> Any:
    await _admin(h)
    return await h.client.get("/api/admin/webhooks")


async def _webhook(h: Harness) -> str:
    await _admin(h)
    made = await h.post("/api/admin/webhooks", {"url": WEBHOOK_URL, "events": ["consult.ended"]})
    assert made.status == 201, await made.text()
    endpoint_id: str = (await made.json())["endpoint"]["id"]
    return endpoint_id


async def webhook_deliveries(h: Harness) -> Any:
    endpoint_id = await _webhook(h)
    return await h.client.get(f"/api/admin/webhooks/{endpoint_id}/deliveries")


async def webhook_rotate(h: Harness) -> Any:
    endpoint_id = await _webhook(h)
    return await h.post(f"/api/admin/webhooks/{endpoint_id}/rotate-secret")


async def webhook_delete(h: Harness) -> Any:
    endpoint_id = await _webhook(h)
    return await h.client.delete(f"/api/admin/webhooks/{endpoint_id}", headers=h.headers)


async def billing_export(h: Harness) -> Any:
    await _admin(h)
    return await h.client.get("/api/admin/billing", params={"month": "2026-11"})


async def retention_preview(h: Harness) -> Any:
    await _admin(h)
    return await h.client.get("/api/admin/retention/preview")


async def practice_read(h: Harness) -> Any:
    await _admin(h)
    return await h.client.get("/api/admin/practice-settings")


async def practice_update(h: Harness) -> Any:
    await _admin(h)
    body = {"recording_allowed": False, "invite_validity_s": None}
    return await h.client.put("/api/admin/practice-settings", json=body, headers=h.headers)


async def receipt_read(h: Harness) -> Any:
    setup = await _therapist(h)
    async with h.app[DB_ENGINE].begin() as conn:
        await mark_started(conn, uuid.UUID(setup.consult_id), now=h.clock.now())
    issued = await h.issue_receipt(setup.invite_token, setup.consult_id)
    h.client.session.cookie_jar.clear()  # the patient has no session
    return await h.client.get(f"/api/receipts/{(await issued.json())['receipt_token']}")


# Routes that return (or change) personal data: the request, and the action logged.
PERSONAL: dict[tuple[str, str], tuple[Scenario, str]] = {
    ("POST", "/api/login"): (login, "session.login"),
    ("GET", "/api/session"): (session, "session.read"),
    ("GET", "/api/enrolment/{token}"): (enrolment_read, "enrolment.read"),
    ("POST", "/api/enrolment/{token}/password"): (enrolment_password, "enrolment.password"),
    ("POST", "/api/enrolment/{token}/confirm"): (enrolment_confirm, "enrolment.confirm"),
    ("GET", "/api/admin/accounts"): (accounts_list, "account.list"),
    ("POST", "/api/admin/accounts"): (accounts_create, "account.create"),
    ("GET", "/api/admin/accounts/{account_id}"): (account_read, "account.read"),
    ("PATCH", "/api/admin/accounts/{account_id}"): (account_patch, "account.set-role"),
    ("PUT", "/api/admin/accounts/{account_id}/external-id"): (
        account_external_id,
        "account.set-external-id",
    ),
    ("POST", "/api/admin/accounts/{account_id}/disable"): (account_disable, "account.disable"),
    ("POST", "/api/admin/accounts/{account_id}/enable"): (account_enable, "account.enable"),
    ("POST", "/api/admin/accounts/{account_id}/reset-totp"): (
        account_reset_totp,
        "account.reset-totp",
    ),
    ("POST", "/api/session/notices/{notice_id}/dismiss"): (notice_dismiss, "notice.dismiss"),
    ("GET", "/api/account/export"): (account_export, "account.export"),
    ("POST", "/api/admin/accounts/{account_id}/erase"): (account_erase, "account.erase"),
    ("GET", "/api/admin/access-log"): (access_log_read, "access_log.read"),
    ("GET", "/api/admin/retention"): (retention_read, "retention.read"),
    ("PUT", "/api/admin/retention"): (retention_update, "retention.update"),
    ("GET", "/api/support/consults"): (support_consults, "support.consult.list"),
    ("GET", "/api/support/charts/consults-per-day.svg"): (
        support_chart_days,
        "support.chart.consults_per_day",
    ),
    ("GET", "/api/support/charts/durations.svg"): (
        support_chart_durations,
        "support.chart.durations",
    ),
    ("GET", "/api/support/consults/{consult_id}/technical-log"): (
        support_technical_log,
        "support.technical_log.read",
    ),
    ("GET", "/api/admin/access-log/verify"): (access_log_verify, "access_log.verify"),
    ("GET", "/api/admin/access-log/export"): (access_log_export, "access_log.export"),
    ("GET", "/api/admin/retention/preview"): (retention_preview, "retention.preview"),
    ("GET", "/api/admin/billing"): (billing_export, "billing.export"),
    ("POST", "/api/admin/webhooks"): (webhook_create, "webhook.create"),
    ("GET", "/api/admin/webhooks"): (webhook_list, "webhook.list"),
    ("GET", "/api/admin/webhooks/{endpoint_id}/deliveries"): (
        webhook_deliveries,
        "webhook.deliveries.read",
    ),
    ("POST", "/api/admin/webhooks/{endpoint_id}/rotate-secret"): (
        webhook_rotate,
        "webhook.rotate-secret",
    ),
    ("DELETE", "/api/admin/webhooks/{endpoint_id}"): (webhook_delete, "webhook.delete"),
    ("GET", "/api/admin/practice-settings"): (practice_read, "practice_settings.read"),
    ("PUT", "/api/admin/practice-settings"): (practice_update, "practice_settings.update"),
    ("POST", "/api/consults"): (consult_create, "consult.create"),
    ("GET", "/api/consults"): (consult_list, "consult.list"),
    ("GET", "/api/consults/{consult_id}"): (consult_read, "consult.read"),
    ("POST", "/api/consults/{consult_id}/end"): (consult_end, "consult.end"),
    ("POST", "/api/consults/{consult_id}/invite"): (consult_reissue, "consult.invite"),
    ("DELETE", "/api/consults/{consult_id}/invite"): (consult_revoke, "consult.invite.revoke"),
    ("GET", "/api/recordings"): (recording_list, "recording.list"),
    ("GET", "/api/recordings/{recording_id}/download"): (recording_download, "recording.download"),
    ("GET", "/api/recordings/{recording_id}/media"): (recording_play, "recording.play"),
    ("DELETE", "/api/recordings/{recording_id}"): (recording_delete, "recording.delete"),
    ("GET", "/api/receipts/{token}"): (receipt_read, "receipt.read"),
}


def routes_of(harness: Harness) -> set[tuple[str, str]]:
    found = set()
    for route in harness.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if route.method == "HEAD" or path is None or str(path).startswith("/static"):
            continue
        # Route patterns with a regular expression: {token:[A-Za-z]+} -> {token}
        found.add((route.method, re.sub(r"\{(\w+):[^}]*\}", r"{\1}", str(path))))
    return found


async def test_every_route_is_classified(sqlite_harness: Harness) -> None:
    routes = routes_of(sqlite_harness)
    classified = set(NOT_PERSONAL) | set(PERSONAL)
    assert routes - classified == set(), "classify these routes in this test"
    assert classified - routes == set(), "these routes no longer exist"


async def actions(harness: Harness) -> list[str]:
    async with harness.app[DB_ENGINE].connect() as conn:
        return list((await conn.execute(sa.select(access_log.c.action))).scalars())


@pytest.mark.parametrize("route", sorted(PERSONAL), ids=lambda r: f"{r[0]} {r[1]}")
async def test_each_personal_data_route_writes_the_access_log(
    sqlite_harness: Harness, route: tuple[str, str]
) -> None:
    scenario, action = PERSONAL[route]
    response = await scenario(sqlite_harness)
    assert 200 <= response.status < 300, await response.text()
    logged = await actions(sqlite_harness)
    # The action of the request itself: the last record of its kind.
    assert action in logged, (action, logged)
    assert logged[-1] == action, logged[-3:]


# What support staff may reach (DESIGN.md, roles table): the support view, and
# what every professional may do with their own account.
OPEN_TO_EVERY_PROFESSIONAL = {
    ("POST", "/api/login"),
    ("GET", "/api/session"),
    ("POST", "/api/session/notices/{notice_id}/dismiss"),
    ("GET", "/api/account/export"),
    ("GET", "/api/enrolment/{token}"),
    ("POST", "/api/enrolment/{token}/password"),
    ("POST", "/api/enrolment/{token}/confirm"),
}
# What the holder of a link reads without an account (the patient's receipt).
OPEN_TO_THE_LINK_HOLDER = {("GET", "/api/receipts/{token}")}
ROLE_ROUTES = sorted(
    route
    for route in PERSONAL
    if route not in OPEN_TO_EVERY_PROFESSIONAL | OPEN_TO_THE_LINK_HOLDER
    and not route[1].startswith("/api/support/")
)


def concrete(path: str) -> str:
    for name in ("{account_id}", "{consult_id}", "{recording_id}", "{endpoint_id}"):
        path = path.replace(name, str(uuid.uuid4()))
    return path


@pytest.mark.parametrize("route", ROLE_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
async def test_support_is_refused_outside_its_row_and_each_refusal_is_logged(
    sqlite_harness: Harness, route: tuple[str, str]
) -> None:
    harness = sqlite_harness
    sam = await harness.professional("sam@praktijk-noord.example", Role.SUPPORT)
    await harness.logged_in(sam)
    method, path = route
    response = await harness.client.request(
        method, concrete(path), json={}, headers=harness.headers
    )
    assert response.status == 403, (route, response.status, await response.text())
    async with harness.app[DB_ENGINE].connect() as conn:
        last = (
            await conn.execute(sa.select(access_log).order_by(access_log.c.id.desc()).limit(1))
        ).one()
    assert (last.actor_id, last.actor_role, last.outcome) == (sam.account_id, "support", "refused")
