"""The support view in real Chromium: a support professional logs in, lands
on /support, pages through and filters the organisation's consults, sees
both charts drawn, and opens the technical log of a consult whose patient
could not connect; a therapist is sent to their own page instead."""

from __future__ import annotations

import random
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from playwright.async_api import Browser, BrowserContext, Page, expect

from audit.consults import create_consult, mark_ended, mark_started
from audit.roles import Role
from audit.schema import access_log
from audit.support import TherapistPseudonyms
from audit.technical_log import write_technical
from server.app_keys import DB_ENGINE, MASTER_KEY
from tests.support.axe import assert_accessible
from tests.support.browser import ScreenshotSaver, assert_no_browser_errors, new_context
from tests.support.harness import Harness, Professional

pytestmark = pytest.mark.browser

# The login page asks who is logged in before anyone is.
EXPECTED_HTTP_ERRORS = [r"status of 401 .*/api/session"]
CHARTS_DRAWN = """(wanted) => ["chart-per-day", "chart-durations"].every((id) => {
  const image = document.getElementById(id);
  return image.complete && image.naturalWidth > 0 && image.src.includes(wanted);
})"""


async def a_month_of_consults(
    harness: Harness, therapists: list[Professional]
) -> list[tuple[uuid.UUID, Professional, str]]:
    """Forty consults over the last four weeks: most of 15 to 55 minutes, some short, a
    few never started. Returns (id, therapist, status) of each."""
    rng = random.Random(6)
    now = harness.clock.now()
    made = []
    async with harness.app[DB_ENGINE].begin() as conn:
        for _ in range(40):
            therapist = rng.choice(therapists)
            at = now - timedelta(days=rng.randint(1, 27), hours=rng.randint(0, 9))
            consult = await create_consult(conn, therapist_id=therapist.account_id, now=at)
            if rng.random() < 0.1:
                await mark_ended(conn, consult.id, now=at + timedelta(hours=2))
                made.append((consult.id, therapist, "not_started"))
                continue
            await mark_started(conn, consult.id, now=at + timedelta(minutes=2))
            minutes = rng.choice([rng.uniform(0.5, 4), *[rng.uniform(15, 55)] * 5])
            await mark_ended(conn, consult.id, now=at + timedelta(minutes=2 + minutes))
            made.append((consult.id, therapist, "ended"))
    return made


async def a_failed_call_this_morning(harness: Harness, therapist: Professional) -> uuid.UUID:
    """A consult of half an hour ago whose patient's camera was busy and whose
    connection failed, with what the technical log holds about it."""
    now = harness.clock.now()
    at = now - timedelta(minutes=30)
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(conn, therapist_id=therapist.account_id, now=at)
        await mark_started(conn, consult.id, now=at + timedelta(minutes=1))
        await mark_ended(conn, consult.id, now=at + timedelta(minutes=4))
        subject = str(consult.id)
        patient = {"role": "patient", "connection": "c7f3"}
        events: list[tuple[int, str, dict[str, Any]]] = [
            (
                60,
                "signaling.connected",
                {
                    **patient,
                    "address": "192.0.2.41",
                    "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X)",
                },
            ),
            (62, "client.media-error", {**patient, "detail": {"camera": "busy"}}),
            (75, "client.ice-state", {**patient, "detail": {"state": "checking"}}),
            (105, "client.ice-state", {**patient, "detail": {"state": "failed"}}),
            (
                106,
                "client.call-failed",
                {**patient, "detail": {"ice": "failed", "localCandidates": 1, "bytesSent": 0}},
            ),
            (230, "signaling.disconnected", {**patient, "detail": {"grace": False}}),
            (240, "signaling.consult-ended", {"reason": "both_left"}),
        ]
        for offset_s, kind, detail in events:
            await write_technical(
                conn, kind, now=at + timedelta(seconds=offset_s), subject=subject, detail=detail
            )
    return consult.id


async def logs_in(
    harness: Harness, browser: Browser, who: Professional, *, path: str = "/login"
) -> tuple[BrowserContext, Page]:
    context = await new_context(browser, harness.origin, locale="en-GB")
    page = await context.new_page()
    await page.goto(path)
    await page.fill("#email", who.email)
    await page.fill("#password", who.password)
    await page.fill("#code", harness.code(who.secret))
    await page.click("#login-button")
    return context, page


async def test_support_filters_consults_sees_the_charts_and_a_technical_log(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    harness = live_harness
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    bram = await harness.professional("bram@praktijk-noord.example", Role.THERAPIST)
    made = await a_month_of_consults(harness, [anna, bram])
    failed = await a_failed_call_this_morning(harness, anna)
    sam = await harness.professional("sam@praktijk-noord.example", Role.SUPPORT)

    context, page = await logs_in(harness, chromium, sam)
    await page.wait_for_url("**/support?**")
    await expect(page.locator("#view")).to_be_visible()
    await expect(page.locator("#summary")).to_contain_text("41 consults from")
    await expect(page.locator("#rows tr")).to_have_count(25)
    await expect(page.locator("#rows tr").first).to_have_attribute("data-consult", str(failed))
    # How it ended, from the technical log of the last 24 hours; older ends say only "Ended".
    failed_status = page.locator(f'tr[data-consult="{failed}"] td.status')
    await expect(failed_status).to_have_text("Ended · both left")
    await page.wait_for_function(CHARTS_DRAWN, arg="tz=")
    await screenshot(page, "support-overview")
    await assert_accessible(page, "support-overview")

    await page.click("#next")
    await expect(page.locator("#page-info")).to_have_text("Page 2 of 2")
    await expect(page.locator("#rows tr")).to_have_count(16)
    assert "page=2" in page.url

    pseudonym = TherapistPseudonyms(harness.app[MASTER_KEY].key).of(bram.account_id)
    await page.select_option("#status", "ended")
    await page.select_option("#therapist", pseudonym)
    await page.click("#apply")
    brams_ended = [c for c, who, status in made if who is bram and status == "ended"]
    await expect(page.locator("#rows tr")).to_have_count(len(brams_ended))
    await expect(page.locator("#page-info")).to_have_text("Page 1 of 1")
    statuses = await page.locator("#rows td.status").all_text_contents()
    assert set(statuses) == {"Ended"}
    assert set(await page.locator("#rows td.pseudonym").all_text_contents()) == {pseudonym}
    await page.wait_for_function(CHARTS_DRAWN, arg=f"therapist={pseudonym}")
    await screenshot(page, "support-filtered")
    await assert_accessible(page, "support-filtered")
    # Only pseudonyms: no address, no account id anywhere on the page.
    content = await page.content()
    for secret in (anna.email, bram.email, str(anna.account_id), str(bram.account_id)):
        assert secret not in content

    await page.click("#reset")
    await expect(page.locator("#rows tr")).to_have_count(25)
    await page.locator(f'tr[data-consult="{failed}"] button').click()
    log = page.locator("#technical-log")
    await expect(log).to_be_visible()
    await expect(page.locator("#log-rows tr")).to_have_count(7)
    await expect(page.locator("#log-rows tr").first).to_contain_text("signaling.consult-ended")
    await expect(log).to_contain_text("camera: busy")
    await expect(log).to_contain_text("192.0.2.41")
    await expect(page.locator("#log-consult")).to_contain_text(str(failed))
    await expect(page.locator(f'tr[data-consult="{failed}"]')).to_have_class("selected")
    await screenshot(page, "support-technical-log")
    await assert_accessible(page, "support-technical-log")

    # A problem with the filters, on screen as the language changes.
    await page.fill("#from", "2026-12-05")
    await page.fill("#to", "2026-12-01")
    await page.click("#apply")
    await expect(page.locator("#filter-error")).to_have_text(
        "The start date must not be after the end date."
    )
    await page.select_option("#language", "nl")
    await expect(page.locator("#view h1")).to_have_text("Consulten van uw organisatie")
    await expect(page.locator("#log-heading")).to_have_text("Technisch logboek")
    await expect(failed_status).to_have_text("Beëindigd · beiden vertrokken")
    await expect(page.locator("#filter-error")).to_have_text(
        "De begindatum mag niet na de einddatum liggen."
    )
    await page.wait_for_function(CHARTS_DRAWN, arg="lang=nl")
    await screenshot(page, "support-dutch")
    await assert_accessible(page, "support-dutch")

    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)
    async with harness.app[DB_ENGINE].connect() as conn:
        logged = (
            await conn.execute(
                sa.select(access_log.c.action).where(
                    access_log.c.actor_id == sam.account_id,
                    access_log.c.action.startswith("support."),
                )
            )
        ).scalars()
        actions = set(logged)
    assert actions == {
        "support.consult.list",
        "support.chart.consults_per_day",
        "support.chart.durations",
        "support.technical_log.read",
    }


async def test_a_therapist_goes_to_their_own_page_and_is_refused_the_support_view(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    anna = await live_harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    # A "next" of another role's page is not followed: the therapist lands on /app.
    context, page = await logs_in(live_harness, chromium, anna, path="/login?next=/support")
    await page.wait_for_url("**/app")
    await expect(page.locator("#dashboard")).to_be_visible()
    await page.goto("/support")
    await expect(page.locator("#refused")).to_be_visible()
    await expect(page.locator("#refused")).to_contain_text("This page is for support staff.")
    await expect(page.locator("#view")).to_be_hidden()
    await screenshot(page, "support-refused-for-a-therapist")
    await assert_accessible(page, "support-refused-for-a-therapist")
    # The way to the own page follows the language, as the rest of the page does.
    await page.select_option("#language", "nl")
    await expect(page.locator("#refused-home")).to_have_text(
        "Uw account heeft een eigen pagina: uw consulten"
    )
    await expect(page.locator("#refused-home a")).to_have_attribute("href", "/app")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


async def test_a_support_login_follows_next_within_the_support_view(
    chromium: Browser, live_harness: Harness
) -> None:
    sam = await live_harness.professional("sam@praktijk-noord.example", Role.SUPPORT)
    context, page = await logs_in(
        live_harness, chromium, sam, path="/login?next=%2Fsupport%3Fstatus%3Dended"
    )
    await page.wait_for_url("**/support?**")
    await expect(page.locator("#status")).to_have_value("ended")
    assert "status=ended" in page.url
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)
