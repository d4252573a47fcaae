"""The practice's appointment reference and an account's external id in real
Chromium (issue 21, item 4): the admin allows references in the practice's
settings and sets, changes and clears external ids in the accounts list
(a taken one and a malformed one refused, said plainly); the therapist's
new-consult form offers the reference field only while the practice allows
it, and the consult made with one holds it sealed. In English and Dutch, on
a laptop and on a phone; axe-core checks every state.
"""

from __future__ import annotations

import uuid

import pytest
from playwright.async_api import Browser, BrowserContext, Locator, Page, ViewportSize, expect

from audit.accounts import get_account
from audit.practice import PracticeSettings, practice_settings_of, set_practice_settings
from audit.references import read_references
from audit.roles import Role
from server.app_keys import DB_ENGINE, MASTER_KEY
from tests.support.axe import assert_accessible
from tests.support.browser import (
    PHONE,
    ScreenshotSaver,
    assert_no_browser_errors,
    create_consult,
    logs_in,
    new_context,
    submit_login,
    therapist_logs_in,
)
from tests.support.harness import Harness, Professional
from tests.support.traces import traces

pytestmark = pytest.mark.browser

REFERENCE = "AFSPRAAK-2026-0042/Zwaluw"
# The login page asks who is logged in before anyone is; a taken id is a planned
# 409, a malformed one a planned 422.
EXPECTED_HTTP_ERRORS = [
    r"status of 401 .*/api/session",
    r"status of 409 .*/external-id",
    r"status of 422 .*/external-id",
]


async def admin_opens_console(
    harness: Harness,
    browser: Browser,
    ada: Professional,
    *,
    locale: str = "en-GB",
    viewport: ViewportSize | None = None,
) -> tuple[BrowserContext, Page]:
    context = await new_context(browser, harness.origin, locale=locale, viewport=viewport)
    page = await context.new_page()
    await page.goto("/login")
    await submit_login(harness, page, ada)
    await page.wait_for_url("**/admin")
    # The practice's settings shown (a box ticked before they come would be reset).
    await expect(page.locator("#invite-validity option").first).to_be_attached()
    return context, page


def account_row(page: Page, email: str) -> Locator:
    return page.locator(f'#account-rows tr[data-email="{email}"]')


async def external_id_of(harness: Harness, who: Professional) -> str | None:
    async with harness.app[DB_ENGINE].connect() as conn:
        return (await get_account(conn, who.account_id)).external_id


async def set_external_id(
    page: Page, email: str, value: str, *, named: str = "External id of"
) -> None:
    """Open the account's dialog (its button ``named`` and the address) and save
    ``value`` (the dialog may stay open)."""
    await account_row(page, email).get_by_role("button", name=f"{named} {email}").click()
    await expect(page.locator("#external-id-dialog")).to_be_visible()
    await page.fill("#external-id-input", value)
    await page.click("#external-id-save")


async def test_an_admin_allows_references_and_sets_external_ids(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    harness = live_harness
    carla = await harness.professional("carla@praktijk-noord.example", Role.THERAPIST)
    bram = await harness.professional("bram@praktijk-noord.example", Role.THERAPIST)
    ada = await harness.professional("ada@praktijk-noord.example", Role.ADMIN)
    context, page = await admin_opens_console(harness, chromium, ada)

    # The practice's switch: off by default, then on, and kept on reload.
    switch = page.locator("#references-allowed")
    await expect(switch).not_to_be_checked()
    await expect(page.locator("#references-note")).to_contain_text("destroyed once the record")
    await switch.check()
    await page.click("#practice-save")
    await expect(page.locator("#practice-status")).to_contain_text("Saved.")
    async with harness.app[DB_ENGINE].connect() as conn:
        practice = await practice_settings_of(conn, ada.organisation.id)
    assert practice.appointment_reference_allowed is True
    assert practice.recording_allowed is True  # the other settings as they were
    await assert_accessible(page, "references allowed")

    # External ids: none yet; one set; a taken one and a malformed one refused.
    await expect(account_row(page, carla.email)).to_contain_text("—")
    await set_external_id(page, carla.email, "  BIG-19012345 ")
    await expect(page.locator("#external-id-dialog")).to_be_hidden()
    await expect(account_row(page, carla.email)).to_contain_text("BIG-19012345")
    assert await external_id_of(harness, carla) == "BIG-19012345"
    await assert_accessible(page, "external id set")

    await set_external_id(page, bram.email, "BIG-19012345")
    error = page.locator("#external-id-error")
    await expect(error).to_have_text(
        "Another account of your practice has this external id already."
    )
    await screenshot(page, "external-id-taken")
    await assert_accessible(page, "external id taken")
    await page.fill("#external-id-input", "B" * 65)
    await page.click("#external-id-save")
    await expect(error).to_contain_text("1 to 64 characters")
    await assert_accessible(page, "external id malformed")
    await page.click("#external-id-cancel")
    await expect(page.locator("#external-id-dialog")).to_be_hidden()
    assert await external_id_of(harness, bram) is None

    # Changed, then cleared (an empty field).
    await set_external_id(page, carla.email, "BIG-29012345")
    await expect(account_row(page, carla.email)).to_contain_text("BIG-29012345")
    await set_external_id(page, carla.email, "")
    await expect(page.locator("#external-id-dialog")).to_be_hidden()
    await expect(account_row(page, carla.email)).not_to_contain_text("BIG-")
    assert await external_id_of(harness, carla) is None

    # In Dutch: the switch, its sentence and the dialog's refusal.
    await page.select_option("#language", "nl")
    await expect(page.locator("label[for=references-allowed]")).to_contain_text("afspraaknummer")
    await set_external_id(page, carla.email, "BIG-1", named="Extern id van")
    await set_external_id(page, bram.email, "BIG-1", named="Extern id van")
    await expect(error).to_have_text("Een ander account van uw praktijk heeft dit externe id al.")
    await screenshot(page, "external-id-dutch")
    await assert_accessible(page, "Dutch, external id taken")
    await page.click("#external-id-cancel")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


async def test_the_reference_field_follows_the_practice_and_the_reference_is_sealed(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    harness = live_harness
    _, context, page = await therapist_logs_in(harness, chromium)
    # Off (the default): no field, and a consult is made without one.
    await expect(page.locator("#reference-field")).to_be_hidden()
    await create_consult(page)

    ada = await harness.professional("ada@praktijk-noord.example", Role.ADMIN)
    admin_context, admin = await admin_opens_console(harness, chromium, ada)
    await admin.locator("#references-allowed").check()
    await admin.click("#practice-save")
    await expect(admin.locator("#practice-status")).to_contain_text("Saved.")

    await page.reload()
    field = page.locator("#appointment-reference")
    await expect(field).to_be_visible()
    await expect(page.locator("label[for=appointment-reference]")).to_contain_text(
        "Appointment reference"
    )
    await assert_accessible(page, "dashboard with the reference field")
    await field.fill(REFERENCE)
    consult_id, _ = await create_consult(page)
    await expect(field).to_have_value("")  # the next consult starts empty
    await screenshot(page, "reference-given")
    async with harness.app[DB_ENGINE].connect() as conn:
        kept = await read_references(conn, harness.app[MASTER_KEY].key, [uuid.UUID(consult_id)])
    assert kept == {uuid.UUID(consult_id): REFERENCE}
    # Sealed: the text is in no table and no file of the data directory.
    assert await traces(harness, {"reference": REFERENCE.encode()}) == []

    # Switched off again while the form is open: the refusal is said plainly.
    await admin.locator("#references-allowed").uncheck()
    await admin.click("#practice-save")
    await expect(admin.locator("#practice-status")).to_contain_text("Saved.")
    await field.fill(REFERENCE)
    await page.click("#new-button")
    await expect(page.locator("#new-error")).to_contain_text("no longer attaches")
    await assert_accessible(page, "reference refused")
    await page.reload()
    await expect(page.locator("#reference-field")).to_be_hidden()
    await assert_no_browser_errors(
        context,
        admin_context,
        allow=[r"status of 401 .*/api/session", r"status of 422 .*/api/consults"],
    )


async def test_the_reference_field_in_dutch_on_a_phone(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    harness = live_harness
    ada = await harness.professional("ada@praktijk-noord.example", Role.ADMIN)
    async with harness.app[DB_ENGINE].begin() as conn:
        chosen = PracticeSettings(True, None, appointment_reference_allowed=True)
        await set_practice_settings(conn, ada.organisation.id, chosen, now=harness.clock.now())
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    context = await new_context(chromium, harness.origin, locale="nl-NL", viewport=PHONE)
    page = await context.new_page()
    await page.goto("/app")
    await page.wait_for_url("**/login?**")
    await logs_in(harness, page, anna)
    await expect(page.locator("label[for=appointment-reference]")).to_contain_text("Afspraaknummer")
    await page.fill("#appointment-reference", REFERENCE)
    consult_id, _ = await create_consult(page)
    width = await page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width
    await screenshot(page, "reference-phone-dutch")
    await assert_accessible(page, "Dutch phone, reference given")
    async with harness.app[DB_ENGINE].connect() as conn:
        kept = await read_references(conn, harness.app[MASTER_KEY].key, [uuid.UUID(consult_id)])
    assert kept == {uuid.UUID(consult_id): REFERENCE}

    # The admin console on the phone: the switch and the external-id column fit.
    admin_context, admin = await admin_opens_console(
        harness, chromium, ada, locale="nl-NL", viewport=PHONE
    )
    await expect(admin.locator("#references-allowed")).to_be_checked()
    await set_external_id(admin, anna.email, "BIG-19012345", named="Extern id van")
    await expect(account_row(admin, anna.email)).to_contain_text("BIG-19012345")
    width = await admin.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width
    await assert_accessible(admin, "Dutch phone console")
    await assert_no_browser_errors(context, admin_context, allow=[r"status of 401 .*/api/session"])
