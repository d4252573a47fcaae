"""The admin console's integrations in real Chromium (issue 21, items 4 and 6):
an admin registers a webhook endpoint against a real receiver (an aiohttp
server verifying every signature with ``standardwebhooks``), sees its secret
once, sees consults' deliveries and failures appear, rotates the secret
(the receiver verifies with the new one) and deletes the endpoint; exports a
month of consults for billing (the table, the totals, the Excel, CSV and JSON
downloads); in English and Dutch, on a laptop and on a phone. axe-core
checks every state.

The webhook job waits an hour between rounds: the test sends what is due
itself (:func:`server.webhooks.deliver_due`), as tests/test_webhooks.py does.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from playwright.async_api import Browser, BrowserContext, Locator, Page, ViewportSize, expect

from audit.clock import ManualClock
from audit.consults import create_consult, mark_ended, mark_started
from audit.roles import Role
from audit.schema import access_log, webhook_endpoints
from config import Settings
from server.app_keys import DB_ENGINE
from server.webhooks import deliver_due
from tests.support.axe import assert_accessible
from tests.support.browser import (
    PHONE,
    ScreenshotSaver,
    assert_no_browser_errors,
    new_context,
)
from tests.support.databases import copy_sqlite_template
from tests.support.harness import Harness, Professional
from tests.support.settings import SettingsFactory
from tests.support.webhooks import Receiver

pytestmark = pytest.mark.browser

# The login page asks who is logged in before anyone is; the planned refusal
# of an http address to another host.
EXPECTED_HTTP_ERRORS = [r"status of 401 .*/api/session", r"status of 422 .*/api/admin/webhooks"]
ZONE = "Europe/Amsterdam"  # new_context's time zone
RETRY_FOR_S = 60  # how long a delivery is tried: the shortest the settings allow


@pytest.fixture
def sqlite_settings(
    make_settings: SettingsFactory, sqlite_template: Path, data_dir: Path
) -> Settings:
    """The live harness's settings: http to 127.0.0.1 for the receiver, retries
    that run out in a minute. (conftest's ``sqlite_settings`` does not read the
    ``settings`` marker.)"""
    copy_sqlite_template(sqlite_template, data_dir)
    return make_settings(
        webhooks_allow_http_loopback="true",
        webhooks_poll_interval_s="3600",
        webhooks_retry_base_s="30",
        webhooks_retry_for_s=str(RETRY_FOR_S),
    )


@pytest.fixture
def clock() -> ManualClock:
    # Now, not a fixed day: the page compares the old secret's last day with
    # the browser's clock.
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
async def receiver(free_port: int) -> AsyncIterator[Receiver]:
    found = Receiver(free_port)
    await found.start()
    yield found
    await found.stop()


async def admin_logs_in(
    harness: Harness, browser: Browser, *, viewport: ViewportSize | None = None
) -> tuple[Professional, BrowserContext, Page]:
    ada = await harness.professional("ada@praktijk-noord.example", Role.ADMIN)
    context = await new_context(browser, harness.origin, locale="en-GB", viewport=viewport)
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=harness.origin)
    page = await context.new_page()
    await page.goto("/login")
    await page.fill("#email", ada.email)
    await page.fill("#password", ada.password)
    await page.fill("#code", harness.code(ada.secret))
    await page.click("#login-button")
    await page.wait_for_url("**/admin")
    await expect(page.locator("#endpoints-empty")).to_be_visible()
    return ada, context, page


def endpoint(page: Page, url: str) -> Locator:
    return page.locator(f'#endpoint-list li[data-url="{url}"]')


async def confirm(page: Page, *, contains: str) -> None:
    dialog = page.locator("#confirm")
    await expect(dialog).to_be_visible()
    await expect(dialog).to_contain_text(contains)
    await assert_accessible(page, f"confirmation: {contains}")
    await page.click("#confirm-yes")
    await expect(dialog).to_be_hidden()


def ago(harness: Harness, minutes: int) -> datetime:
    # A consult that ended just now: its events are due now (the manual clock
    # stands still, and moving it would end the admin's idle session).
    return harness.clock.now() - timedelta(minutes=minutes)


async def a_consult(
    harness: Harness, therapist: Professional, at: datetime, minutes: int | None
) -> str:
    """A consult started at ``at`` and ended ``minutes`` later (None: never started)."""
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(conn, therapist_id=therapist.account_id, now=at)
        if minutes is not None:
            await mark_started(conn, consult.id, now=at)
            end = at + timedelta(minutes=minutes)
            await mark_ended(conn, consult.id, now=end, end_reason="ended_by_therapist")
    return str(consult.id)


async def register(
    page: Page, url: str, *, only: list[str] | None = None, payload: str = "standard"
) -> str:
    """Register ``url`` in the form; return the secret shown."""
    await page.fill("#webhook-url", url)
    await page.select_option("#webhook-payload", payload)
    if only is not None:
        for box in await page.locator("#webhook-events input").all():
            await box.set_checked(await box.get_attribute("value") in only)
    await page.click("#webhook-register")
    await expect(page.locator("#secret-box")).to_be_visible()
    secret = await page.input_value("#secret-value")
    assert secret.startswith("whsec_")
    return secret


async def test_an_admin_connects_the_record_system_and_follows_its_deliveries(
    chromium: Browser, live_harness: Harness, receiver: Receiver, screenshot: ScreenshotSaver
) -> None:
    harness = live_harness
    ada, context, page = await admin_logs_in(harness, chromium)
    carla = await harness.professional("carla@praktijk-noord.example", Role.THERAPIST)
    await assert_accessible(page, "no endpoints")

    # The API's rules, said plainly: no http to another host; nothing unchosen.
    await page.fill("#webhook-url", "http://records.example.org/hooks")
    await page.click("#webhook-register")
    await expect(page.locator("#webhook-error")).to_have_text(
        "Use an https:// address (such as https://records.example.org/videoconsult)."
    )
    await page.fill("#webhook-url", receiver.url)
    for box in await page.locator("#webhook-events input").all():
        await box.uncheck()
    await page.click("#webhook-register")
    await expect(page.locator("#webhook-error")).to_have_text("Choose at least one event.")
    await assert_accessible(page, "refused")

    # Registered: the secret once, with a copy button and the warning.
    secret = await register(page, receiver.url, only=["consult.started", "consult.ended"])
    await expect(page.locator("#secret-heading")).to_have_text(f"Secret for {receiver.url}")
    await expect(page.locator("#secret-box")).to_contain_text("shown only now and never again")
    await expect(page.locator("#secret-overlap")).to_be_hidden()
    await page.click("#copy-secret")
    await expect(page.locator("#secret-copy-status")).to_have_text("The secret is copied.")
    assert await page.evaluate("() => navigator.clipboard.readText()") == secret
    await screenshot(page, "webhook-secret")
    await assert_accessible(page, "secret shown")
    await page.click("#close-secret")
    await expect(page.locator("#secret-box")).to_be_hidden()
    assert secret not in await page.content()
    receiver.secret = secret
    listed = endpoint(page, receiver.url)
    # The keyboard goes on from the endpoint the secret was for.
    await expect(listed.get_by_role("button", name="Deliveries to")).to_be_focused()
    await expect(listed).to_contain_text("Consult started")
    await expect(listed).not_to_contain_text("Recording destroyed")
    await expect(listed).to_contain_text("0 waiting, 0 delivered, 0 failed")

    await expect(listed).to_contain_text("Form: Standard (JSON, every event)")

    # A second endpoint, taking FHIR, where nobody listens: its failures show.
    dead_url = f"http://127.0.0.1:{receiver.port}/nobody-here"
    await register(page, dead_url, only=["consult.ended"], payload="fhir")
    await page.click("#close-secret")
    await expect(endpoint(page, dead_url)).to_contain_text("Form: FHIR R4 Encounter")
    await expect(page.locator("#webhook-payload")).to_have_value("standard")
    async with harness.app[DB_ENGINE].connect() as conn:
        stored = await conn.execute(
            sa.select(webhook_endpoints.c.payload).where(webhook_endpoints.c.url == dead_url)
        )
        assert stored.scalar_one() == "fhir"

    # A consult ends; the job sends; the deliveries show how it went.
    consult_id = await a_consult(harness, carla, ago(harness, 25), minutes=25)
    assert await deliver_due(harness.app) == 3
    assert receiver.refused == []
    assert sorted(entry.message["type"] for entry in receiver.received) == [
        "consult.ended",
        "consult.started",
    ]
    await listed.get_by_role("button", name=f"Deliveries to {receiver.url}").click()
    rows = page.locator("#delivery-rows tr")
    await expect(rows).to_have_count(2)
    ended = page.locator('#delivery-rows tr:has-text("Consult ended")')
    await expect(ended).to_contain_text(consult_id)
    await expect(ended).to_contain_text("HTTP 204")
    await expect(ended).to_contain_text("Delivered")
    await expect(ended.locator("td").nth(3)).to_have_text("1")
    await page.click("#refresh-deliveries")  # the counts follow
    await expect(listed).to_contain_text("0 waiting, 2 delivered, 0 failed")
    await screenshot(page, "webhook-deliveries")
    await assert_accessible(page, "deliveries")

    dead = endpoint(page, dead_url)
    await dead.get_by_role("button", name=f"Deliveries to {dead_url}").click()
    await expect(page.locator("#deliveries-heading")).to_have_text(f"Deliveries to {dead_url}")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("HTTP 404")
    await expect(rows.first).to_contain_text("Waiting; next try")
    await page.select_option("#delivery-status", "delivered")
    await expect(page.locator("#deliveries-empty")).to_be_visible()
    await expect(rows).to_have_count(0)
    await page.select_option("#delivery-status", "pending")
    await expect(rows).to_have_count(1)
    await assert_accessible(page, "a failing endpoint")
    # Its retries run out (a minute here): failed, and the counts say so.
    harness.clock.advance(RETRY_FOR_S + 1)
    assert await deliver_due(harness.app) == 1
    await page.click("#refresh-deliveries")
    await expect(rows).to_have_count(0)
    await page.select_option("#delivery-status", "failed")
    await expect(rows).to_have_count(1)
    await expect(rows.first.locator("td").nth(3)).to_have_text("2")
    await expect(rows.first.locator("td").nth(5)).to_have_text("Failed")
    await expect(dead.locator(".endpoint-counts")).to_have_text("0 waiting, 0 delivered, 1 failed")
    await expect(dead.locator(".endpoint-counts")).to_have_class("endpoint-counts has-failures")
    await assert_accessible(page, "a failed delivery")

    # Rotate: the new secret once, the old one signing for a day; the
    # receiver, switched to the new secret, verifies the next message.
    await listed.get_by_role("button", name=f"New secret for {receiver.url}").click()
    await confirm(page, contains="keeps signing too for 24 hours")
    await expect(page.locator("#secret-heading")).to_have_text(f"New secret for {receiver.url}")
    await expect(page.locator("#secret-overlap")).to_contain_text(
        "The old secret keeps signing too for 24 hours"
    )
    new_secret = await page.input_value("#secret-value")
    assert new_secret.startswith("whsec_")
    assert new_secret != secret
    await expect(listed).to_contain_text("The previous secret also signs until")
    await assert_accessible(page, "new secret shown")
    receiver.secret = new_secret
    await a_consult(harness, carla, ago(harness, 10), minutes=10)
    await deliver_due(harness.app)
    assert len(receiver.unique()) == 4
    assert receiver.refused == []

    # Dutch, with the refusal still on screen following the language.
    await page.click("#close-secret")
    await page.fill("#webhook-url", "https://records.example.org:8443/hooks")
    await page.click("#webhook-register")
    await expect(page.locator("#webhook-error")).to_contain_text("This port is not allowed")
    await page.fill("#webhook-url", "https://user:pw@records.example.org/hooks")
    await page.click("#webhook-register")
    await expect(page.locator("#webhook-error")).to_contain_text("Leave the user name")
    await page.select_option("#language", "nl")
    await expect(page.locator("#webhooks-heading")).to_have_text("Webhooks")
    await expect(page.locator("#webhook-error")).to_contain_text("Laat gebruikersnaam")
    await expect(listed).to_contain_text("Consult begonnen")
    await expect(endpoint(page, dead_url)).to_contain_text("Vorm: FHIR R4 Encounter")
    await expect(rows.first).to_contain_text("Mislukt")
    await screenshot(page, "webhooks-dutch")
    await assert_accessible(page, "Dutch")
    await page.select_option("#language", "en")

    # Delete, after a confirmation that says what goes.
    await dead.get_by_role("button", name=f"Delete {dead_url}").click()
    await confirm(page, contains="messages still waiting are dropped")
    await expect(dead).to_have_count(0)
    await expect(page.locator("#deliveries-box")).to_be_hidden()
    await expect(page.locator("#endpoint-list li")).to_have_count(1)
    async with harness.app[DB_ENGINE].connect() as conn:
        kept = (
            await conn.execute(sa.select(webhook_endpoints.c.url, webhook_endpoints.c.payload))
        ).all()
        logged = set(
            (
                await conn.execute(
                    sa.select(access_log.c.action).where(access_log.c.actor_id == ada.account_id)
                )
            ).scalars()
        )
    assert [tuple(row) for row in kept] == [(receiver.url, "standard")]
    assert {
        "webhook.list",
        "webhook.create",
        "webhook.deliveries.read",
        "webhook.rotate-secret",
        "webhook.delete",
    } <= logged
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


def last_month() -> str:
    today = datetime.now(ZoneInfo(ZONE)).date()
    end_of_last = today.replace(day=1) - timedelta(days=1)
    return f"{end_of_last:%Y-%m}"


async def test_an_admin_exports_a_month_of_consults_for_billing(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver, tmp_path: Path
) -> None:
    harness = live_harness
    carla = await harness.professional("carla@praktijk-noord.example", Role.THERAPIST)
    bram = await harness.professional("bram@praktijk-noord.example", Role.THERAPIST)
    october = datetime(2026, 10, 6, 8, 30, tzinfo=UTC)  # 10:30 in Amsterdam
    first = await a_consult(harness, carla, october, minutes=50)
    await a_consult(harness, carla, october + timedelta(days=2), minutes=20)
    await a_consult(harness, carla, october + timedelta(days=3), minutes=None)
    await a_consult(harness, bram, october + timedelta(days=9), minutes=45)
    # 23:30 on 31 October in UTC is 1 November in Amsterdam: not October's.
    await a_consult(harness, bram, datetime(2026, 10, 31, 23, 30, tzinfo=UTC), minutes=30)
    _ada, context, page = await admin_logs_in(harness, chromium)

    await expect(page.locator("#billing-month")).to_have_value(last_month())
    await expect(page.locator("#billing-zone")).to_have_text(
        f"Days and times in your browser's time zone: {ZONE}."
    )
    await page.fill("#billing-month", "2026-10")
    await page.click("#billing-show")
    totals = page.locator("#billing-total-rows tr")
    await expect(totals).to_have_count(2)
    carla_total = page.locator(f'#billing-total-rows tr[data-therapist="{carla.account_id}"]')
    await expect(carla_total.locator("td")).to_have_text([carla.email, "3", "2", "1:10:00"])
    bram_total = page.locator(f'#billing-total-rows tr[data-therapist="{bram.account_id}"]')
    await expect(bram_total.locator("td")).to_have_text([bram.email, "1", "1", "0:45:00"])
    rows = page.locator("#billing-rows tr")
    await expect(rows).to_have_count(4)
    first_row = page.locator(f'#billing-rows tr[data-consult="{first}"] td')
    await expect(first_row).to_have_text(
        [carla.email, "Tue 6 Oct", "", "10:30", "11:20", "0:50:00", "Ended"]
    )
    await expect(rows.filter(has_text="Not started")).to_have_count(1)
    await screenshot(page, "billing-month")
    await assert_accessible(page, "billing month")

    # The downloads are the month on the screen, in the same time zone.
    async with page.expect_download() as as_csv:
        await page.click("#billing-csv")
    download = await as_csv.value
    assert download.suggested_filename == "consults-2026-10.csv"
    path = tmp_path / "billing.csv"
    await download.save_as(path)
    exported = list(csv.DictReader(io.StringIO(path.read_text())))
    assert len(exported) == 4
    assert {row["therapist"] for row in exported} == {carla.email, bram.email}
    assert sum(int(row["duration_s"] or 0) for row in exported) == (50 + 20 + 45) * 60
    assert all(row["date"].startswith("2026-10-") for row in exported)

    # The same month for a bookkeeper's Excel: a byte-order mark, semicolons.
    async with page.expect_download() as for_excel:
        await page.click("#billing-excel")
    download = await for_excel.value
    assert download.suggested_filename == "consults-2026-10-excel.csv"
    path = tmp_path / "billing-excel.csv"
    await download.save_as(path)
    assert path.read_bytes().startswith(b"\xef\xbb\xbftherapist_id;therapist;")
    in_excel = list(csv.DictReader(io.StringIO(path.read_text("utf-8-sig")), delimiter=";"))
    assert [row["consult_id"] for row in in_excel] == [row["consult_id"] for row in exported]

    # One therapist, and the JSON of the same.
    await page.select_option("#billing-therapist", str(bram.account_id))
    await page.click("#billing-show")
    await expect(rows).to_have_count(1)
    await expect(totals).to_have_count(1)
    async with page.expect_download() as as_json:
        await page.click("#billing-json")
    path = tmp_path / "billing.json"
    await (await as_json.value).save_as(path)
    answer = json.loads(path.read_text())
    assert (answer["month"], answer["time_zone"]) == ("2026-10", ZONE)
    assert [t["therapist"] for t in answer["therapists"]] == [bram.email]
    assert answer["therapists"][0]["duration_s"] == 45 * 60

    # A month without consults says so; a month typed wrong is refused here.
    await page.fill("#billing-month", "2026-08")
    await page.click("#billing-show")
    await expect(page.locator("#billing-empty")).to_be_visible()
    await expect(page.locator("#billing-result")).to_be_hidden()

    await page.fill("#billing-month", "2026-10")
    await page.select_option("#billing-therapist", "")
    await page.click("#billing-show")
    await page.select_option("#language", "nl")
    await expect(page.locator("#billing-heading")).to_have_text("Facturatie")
    await expect(page.locator(f'#billing-rows tr[data-consult="{first}"]')).to_contain_text(
        "Beëindigd"
    )
    await expect(page.locator("#billing-csv")).to_have_text("CSV downloaden")
    await expect(page.locator("#billing-excel")).to_have_text("Downloaden voor Excel")
    await screenshot(page, "billing-dutch")
    await assert_accessible(page, "billing in Dutch")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


async def test_webhooks_and_billing_fit_a_phone(
    chromium: Browser, live_harness: Harness, receiver: Receiver, screenshot: ScreenshotSaver
) -> None:
    harness = live_harness
    carla = await harness.professional("carla@praktijk-noord.example", Role.THERAPIST)
    _ada, context, page = await admin_logs_in(harness, chromium, viewport=PHONE)
    receiver.secret = await register(page, receiver.url)
    await assert_accessible(page, "phone: secret shown")
    await page.click("#close-secret")
    at = ago(harness, 30)
    await a_consult(harness, carla, at, minutes=30)
    await deliver_due(harness.app)
    await endpoint(page, receiver.url).get_by_role("button", name="Deliveries to").click()
    await expect(page.locator("#delivery-rows tr")).to_have_count(2)
    month = f"{at.astimezone(ZoneInfo(ZONE)):%Y-%m}"
    await page.fill("#billing-month", month)
    await page.click("#billing-show")
    await expect(page.locator("#billing-rows tr")).to_have_count(1)
    # Nothing wider than the screen: no sideways scrolling of the page.
    width = await page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width
    await screenshot(page, "integrations-phone")
    await assert_accessible(page, "phone: deliveries and billing")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)
