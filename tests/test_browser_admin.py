"""The admin console in real Chromium: an admin logs in and lands on /admin,
creates an account (its one-time link copied and shown as a QR code),
disables, enables, resets and erases accounts and changes a role, each
through a confirmation that says what happens; previews and sets the
retention, sets the practice's settings, filters, exports and verifies the
access log (also a tampered one), in English and Dutch, on a laptop and on a
phone. Every other role is sent to its own page. axe-core checks every state.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from playwright.async_api import Browser, BrowserContext, Locator, Page, ViewportSize, expect

from audit.accounts import get_account
from audit.consults import create_consult, mark_ended, mark_started
from audit.practice import practice_settings_of
from audit.retention import Retention, retention_of
from audit.roles import Role
from audit.schema import access_log
from server.app_keys import DB_ENGINE, SETTINGS
from tests.support.axe import assert_accessible
from tests.support.browser import (
    PHONE,
    ScreenshotSaver,
    assert_no_browser_errors,
    new_context,
)
from tests.support.harness import Harness, Professional

pytestmark = pytest.mark.browser

# The login page asks who is logged in before anyone is; a taken address is a planned 409.
EXPECTED_HTTP_ERRORS = [r"status of 401 .*/api/session", r"status of 409 .*/api/admin/accounts"]


async def logs_in(
    harness: Harness,
    browser: Browser,
    who: Professional,
    *,
    path: str = "/login",
    viewport: ViewportSize | None = None,
) -> tuple[BrowserContext, Page]:
    context = await new_context(browser, harness.origin, locale="en-GB", viewport=viewport)
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=harness.origin)
    page = await context.new_page()
    await page.goto(path)
    await page.fill("#email", who.email)
    await page.fill("#password", who.password)
    await page.fill("#code", harness.code(who.secret))
    await page.click("#login-button")
    return context, page


def row(page: Page, email: str) -> Locator:
    return page.locator(f'#account-rows tr[data-email="{email}"]')


async def confirm(page: Page, *, contains: str) -> None:
    dialog = page.locator("#confirm")
    await expect(dialog).to_be_visible()
    await expect(dialog).to_contain_text(contains)
    await page.click("#confirm-yes")
    await expect(dialog).to_be_hidden()


async def role_of(harness: Harness, who: Professional) -> Role:
    async with harness.app[DB_ENGINE].connect() as conn:
        return (await get_account(conn, who.account_id)).role


async def an_old_consult(harness: Harness, therapist: Professional, days: int) -> None:
    at = harness.clock.now() - timedelta(days=days)
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(conn, therapist_id=therapist.account_id, now=at)
        await mark_started(conn, consult.id, now=at)
        await mark_ended(conn, consult.id, now=at + timedelta(minutes=40))


async def test_an_admin_manages_accounts_from_the_console(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    harness = live_harness
    ada = await harness.professional("ada@praktijk-noord.example", Role.ADMIN)
    carla = await harness.professional("carla@praktijk-noord.example", Role.THERAPIST)
    dave = await harness.professional("dave@praktijk-noord.example", Role.SUPPORT)
    await harness.professional("erik@praktijk-noord.example", Role.THERAPIST)

    # Sent to the admin's own page, whatever "next" said.
    context, page = await logs_in(harness, chromium, ada, path="/login?next=/app")
    await page.wait_for_url("**/admin")
    await expect(page.locator("#view")).to_be_visible()
    await expect(page.locator("#account-rows tr")).to_have_count(4)
    await expect(row(page, ada.email)).to_contain_text("(you)")
    await expect(row(page, ada.email).locator("button")).to_have_count(0)
    await expect(row(page, carla.email)).to_contain_text("Never")
    await expect(row(page, ada.email)).not_to_contain_text("Never")
    await screenshot(page, "admin-overview")
    await assert_accessible(page, "overview")

    # A new account: the link once, a copy button, a QR code.
    await page.fill("#new-email", "bram@praktijk-noord.example")
    await page.select_option("#new-role", "therapist")
    await page.click("#create-button")
    await expect(page.locator("#link-box")).to_be_visible()
    await expect(page.locator("#link-heading")).to_have_text(
        "Account created for bram@praktijk-noord.example"
    )
    link = await page.input_value("#link-url")
    assert link.startswith(f"{harness.origin}/enrol/")
    await page.wait_for_function("() => document.getElementById('link-qr').naturalWidth > 0")
    await page.click("#copy-link")
    await expect(page.locator("#copy-status")).to_have_text("The link is copied.")
    assert await page.evaluate("() => navigator.clipboard.readText()") == link
    await expect(row(page, "bram@praktijk-noord.example")).to_contain_text("Waiting for enrolment")
    await screenshot(page, "admin-enrolment-link")
    await assert_accessible(page, "enrolment link shown")
    await page.click("#close-link")
    await expect(page.locator("#link-box")).to_be_hidden()
    assert await page.input_value("#link-url") == ""

    # A taken address is refused, saying so.
    await page.fill("#new-email", carla.email)
    await page.click("#create-button")
    await expect(page.locator("#create-error")).to_have_text(
        "An account with this e-mail address exists already."
    )

    # Disable (after a confirmation), then enable.
    await row(page, carla.email).get_by_role("button", name=f"Disable {carla.email}").click()
    await assert_accessible(page, "confirmation open")
    await confirm(page, contains="can no longer log in")
    await expect(row(page, carla.email)).to_contain_text("Disabled")
    await row(page, carla.email).get_by_role("button", name=f"Enable {carla.email}").click()
    await expect(row(page, carla.email)).to_contain_text("Active")

    # Reset the authenticator app: a new link, the password stays.
    await (
        row(page, carla.email)
        .get_by_role("button", name=f"Reset the authenticator app of {carla.email}")
        .click()
    )
    await confirm(page, contains="Its password stays the same")
    await expect(page.locator("#link-heading")).to_have_text(
        f"New enrolment link for {carla.email}"
    )
    await expect(row(page, carla.email)).to_contain_text("Waiting for enrolment")
    await page.click("#close-link")

    # Change a role.
    await row(page, dave.email).get_by_label(f"Role of {dave.email}").select_option("therapist")
    async with page.expect_response(f"**/api/admin/accounts/{dave.account_id}") as changed:
        await confirm(page, contains="logged out at once")
    assert (await changed.value).status == 200
    await expect(row(page, dave.email).locator("select")).to_have_value("therapist")
    assert await role_of(harness, dave) is Role.THERAPIST

    # Erase: the confirmation names what goes and what stays.
    erik = "erik@praktijk-noord.example"
    await row(page, erik).get_by_role("button", name=f"Erase {erik}").click()
    await expect(page.locator("#confirm-list li")).to_have_count(5)
    await expect(page.locator("#confirm")).to_contain_text("the account itself")
    await expect(page.locator("#confirm")).to_contain_text("its consult records")
    await screenshot(page, "admin-erase-confirmation")
    await assert_accessible(page, "erase confirmation")
    await confirm(page, contains="cannot be undone")
    await expect(row(page, erik)).to_have_count(0)

    await page.select_option("#language", "nl")
    await expect(page.locator("#view h1")).to_have_text("Uw praktijk")
    await expect(row(page, carla.email)).to_contain_text("Wacht op inrichting")
    # The refusal still on screen follows the language (it stayed English before).
    await expect(page.locator("#create-error")).to_have_text(
        "Er bestaat al een account met dit e-mailadres."
    )
    await screenshot(page, "admin-dutch")
    await assert_accessible(page, "Dutch")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)

    async with harness.app[DB_ENGINE].connect() as conn:
        logged = set(
            (
                await conn.execute(
                    sa.select(access_log.c.action).where(access_log.c.actor_id == ada.account_id)
                )
            ).scalars()
        )
    assert {
        "account.create",
        "account.disable",
        "account.enable",
        "account.reset-totp",
        "account.set-role",
        "account.erase",
    } <= logged


async def test_an_admin_sets_retention_and_practice_settings_and_reads_the_access_log(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver, tmp_path: Path
) -> None:
    harness = live_harness
    ada = await harness.professional("ada@praktijk-noord.example", Role.ADMIN)
    carla = await harness.professional("carla@praktijk-noord.example", Role.THERAPIST)
    await an_old_consult(harness, carla, days=100)
    await an_old_consult(harness, carla, days=3)
    context, page = await logs_in(harness, chromium, ada)
    await page.wait_for_url("**/admin")

    # Retention: the sentence, a dry run of a shorter period, then saved.
    sentence = page.locator("#retention-sentence")
    await expect(sentence).to_contain_text("destroyed 730 days after the consult ended")
    await page.fill("#consult-days", "30")
    await page.click("#retention-preview")
    await expect(page.locator("#preview-box")).to_be_visible()
    await expect(page.locator("#preview-text")).to_contain_text("not saved yet")
    await expect(page.locator("#preview-list")).to_contain_text("1 consult records")
    await expect(page.locator("#preview-list")).to_contain_text("0 recordings")
    await assert_accessible(page, "retention preview")
    await page.click("#retention-save")
    await expect(page.locator("#retention-status")).to_have_text(
        "Saved. The next purge applies it."
    )
    await expect(sentence).to_contain_text("destroyed 30 days after the consult ended")
    await page.fill("#consult-days", "0")
    await page.click("#retention-save")
    await expect(page.locator("#retention-error")).to_contain_text("from 1 to 36,500")
    async with harness.app[DB_ENGINE].connect() as conn:
        saved = await retention_of(
            conn, ada.organisation.id, defaults=default_retention_of(harness)
        )
    assert saved.consult_days == 30
    await screenshot(page, "admin-retention")

    # The practice's settings.
    await expect(page.locator("#recording-allowed")).to_be_checked()
    await page.uncheck("#recording-allowed")
    await page.select_option("#invite-validity", str(4 * 3600))
    await page.click("#practice-save")
    await expect(page.locator("#practice-status")).to_contain_text("Saved.")
    async with harness.app[DB_ENGINE].connect() as conn:
        practice = await practice_settings_of(conn, ada.organisation.id)
    assert (practice.recording_allowed, practice.invite_validity_s) == (False, 4 * 3600)
    await page.reload()
    await expect(page.locator("#invite-validity")).to_have_value(str(4 * 3600))
    await expect(page.locator("#recording-allowed")).not_to_be_checked()
    await assert_accessible(page, "practice settings saved")

    # The access log: newest first, filtered, exported, verified.
    # (Read at the reload, with the page's other reads: their order varies.)
    await expect(page.locator("#log-rows")).to_contain_text("retention.update")
    await expect(page.locator("#log-rows")).to_contain_text("practice_settings.update")
    await page.fill("#log-action", "practice_settings.update")
    await page.click("#log-apply")
    await expect(page.locator("#log-rows tr")).to_have_count(1)
    await expect(page.locator("#log-rows tr")).to_contain_text(ada.email)
    await screenshot(page, "admin-access-log-filtered")
    async with page.expect_download() as as_csv:
        await page.click("#export-csv")
    path = tmp_path / "log.csv"
    await (await as_csv.value).save_as(path)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [r["action"] for r in rows] == ["practice_settings.update"]
    async with page.expect_download() as as_json:
        await page.click("#export-json")
    path = tmp_path / "log.json"
    await (await as_json.value).save_as(path)
    exported = json.loads(path.read_text())
    assert exported["filters"]["action"] == "practice_settings.update"
    assert [r["action"] for r in exported["records"]] == ["practice_settings.update"]

    await page.click("#verify")
    result = page.locator("#verify-result")
    await expect(result).to_contain_text("The access log is whole")
    await expect(result).to_have_class("verify-result whole")
    await assert_accessible(page, "chain whole")
    async with harness.app[DB_ENGINE].begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE access_log SET action = 'account.read' WHERE action = 'retention.update'"
            )
        )
    await page.click("#verify")
    await expect(result).to_contain_text("The access log is NOT whole")
    await expect(result).to_contain_text("changed after it was written")
    await screenshot(page, "admin-chain-broken")
    await assert_accessible(page, "chain broken")

    await page.select_option("#language", "nl")
    await expect(result).to_contain_text("Het toegangslogboek is NIET compleet")
    await assert_accessible(page, "Dutch, chain broken")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


def default_retention_of(harness: Harness) -> Retention:
    settings = harness.app[SETTINGS].retention
    return Retention(settings.consult_days, settings.recording_days, settings.access_log_days)


async def test_the_console_fits_a_phone(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    harness = live_harness
    ada = await harness.professional("ada@praktijk-noord.example", Role.ADMIN)
    await harness.professional("carla@praktijk-noord.example", Role.THERAPIST)
    context, page = await logs_in(harness, chromium, ada, viewport=PHONE)
    await page.wait_for_url("**/admin")
    await expect(page.locator("#account-rows tr")).to_have_count(2)
    await page.fill("#new-email", "bram@praktijk-noord.example")
    await page.click("#create-button")
    await expect(page.locator("#link-box")).to_be_visible()
    # Nothing wider than the screen: no sideways scrolling of the page.
    width = await page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width
    await screenshot(page, "admin-phone")
    await assert_accessible(page, "phone")
    await page.click("#verify")
    await expect(page.locator("#verify-result")).to_contain_text("whole")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


@pytest.mark.parametrize(
    ("role", "home", "page_path", "shown"),
    [
        (Role.THERAPIST, "/app", "/admin", "#refused"),
        (Role.SUPPORT, "/support", "/admin", "#refused"),
        (Role.ADMIN, "/admin", "/app", "#loading"),
        (Role.ADMIN, "/admin", "/support", "#refused"),
    ],
)
async def test_a_page_of_another_role_says_where_to_go_instead(
    chromium: Browser,
    live_harness: Harness,
    screenshot: ScreenshotSaver,
    role: Role,
    home: str,
    page_path: str,
    shown: str,
) -> None:
    who = await live_harness.professional("someone@praktijk-noord.example", role)
    context, page = await logs_in(live_harness, chromium, who)
    await page.wait_for_url(f"**{home}*")
    # The own page has loaded (its requests done) before going elsewhere.
    await expect(page.locator("#dashboard" if role is Role.THERAPIST else "#view")).to_be_visible()
    # (Its charts and lists too: a request cut off by leaving would be a console error.)
    await page.wait_for_load_state("networkidle")
    await page.goto(page_path)
    section = page.locator(shown)
    # A shared machine can be slow to answer the first request of a page.
    await expect(section).to_contain_text("Your account has another role.", timeout=15_000)
    link = section.locator(f'a[href="{home}"]')
    await expect(link).to_be_visible()
    await screenshot(page, f"{page_path.strip('/')}-for-{role.value}")
    await assert_accessible(page, f"{page_path} for a {role.value}")
    await link.click()
    await page.wait_for_url(f"**{home}*")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)
