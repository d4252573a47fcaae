"""Appointments in real Chromium: the dashboard by time, and a patient who
comes before the waiting room opens."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from playwright.async_api import Browser, Page, expect

from tests.support.axe import assert_accessible
from tests.support.browser import (
    EXPECTED_HTTP_ERRORS,
    assert_no_browser_errors,
    create_consult,
    new_context,
    therapist_logs_in,
)
from tests.support.harness import Harness

pytestmark = pytest.mark.browser

# The browser contexts' time zone (tests/support/browser.py, new_context).
ZONE = ZoneInfo("Europe/Amsterdam")


def local_day(days_ahead: int, time: str) -> str:
    """A datetime-local value ``days_ahead`` of the browser's today, at ``time``."""
    day = (datetime.now(ZONE) + timedelta(days=days_ahead)).date()
    return f"{day.isoformat()}T{time}"


async def book(page: Page, name: str, when: str = "") -> str:
    if when:
        await page.fill("#scheduled-at", when)
    _consult_id, url = await create_consult(page, name=name)
    await expect(page.locator("#scheduled-at")).to_have_value("")
    return url


async def test_the_dashboard_lists_todays_and_upcoming_consults_by_time_then_earlier_ones(
    chromium: Browser, live_harness: Harness
) -> None:
    _anna, context, page = await therapist_logs_in(live_harness, chromium)
    # The server's clock stands weeks before the browser's: a consult without
    # an appointment was made "earlier".
    await book(page, "Zonder afspraak")
    # Booked in the other order than they come: newest first would be wrong.
    await book(page, "Morgen", local_day(1, "09:00"))
    await book(page, "Overmorgen", local_day(2, "10:00"))
    groups = page.locator("#list-groups")
    await expect(groups.locator("h3")).to_have_text(["Today and upcoming", "Earlier"])
    upcoming, earlier = groups.locator("table").nth(0), groups.locator("table").nth(1)
    await expect(upcoming.locator("tbody tr td:nth-child(2)")).to_have_text(
        ["Morgen", "Overmorgen"]
    )
    await expect(upcoming.locator("tbody tr td:nth-child(1)").first).to_contain_text("09:00")
    await expect(earlier.locator("tbody tr td:nth-child(2)")).to_have_text(["Zonder afspraak"])
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


async def test_a_patient_who_comes_early_is_told_in_dutch_when_to_come_back(
    chromium: Browser, live_harness: Harness
) -> None:
    _anna, therapist, page = await therapist_logs_in(live_harness, chromium)
    url = await book(page, "Mevr. Jansen", local_day(2, "10:00"))
    patient = await new_context(chromium, live_harness.origin, locale="nl-NL")
    patient_page = await patient.new_page()
    await patient_page.goto(url)
    await expect(patient_page.get_by_role("heading", name="U bent te vroeg")).to_be_visible()
    text = patient_page.locator("#too-early-text")
    await expect(text).to_contain_text("De wachtkamer gaat open op")
    await expect(text).to_contain_text("om 09:45")  # 15 minutes before, the default
    await assert_accessible(patient_page, "too early")
    await assert_no_browser_errors(therapist, patient, allow=EXPECTED_HTTP_ERRORS)
