"""The therapist's consults on the dashboard, a page at a time: every consult
of today and later is shown, however many were booked after it; "Older
consults" adds the earlier ones a page at a time and goes away."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from playwright.async_api import Browser, expect

from audit.consults import create_consult
from server.app_keys import DB_ENGINE
from tests.support.axe import assert_accessible
from tests.support.browser import (
    EXPECTED_HTTP_ERRORS,
    ScreenshotSaver,
    assert_no_browser_errors,
    therapist_logs_in,
)
from tests.support.harness import Harness

pytestmark = pytest.mark.browser


async def test_todays_appointment_is_shown_behind_a_hundred_later_ones(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    """A practice that books ahead: 100 appointments in the coming weeks fill
    the list's first page (latest first), today's is on the second, and 150
    earlier consults follow it. Before, the dashboard read one list of the
    100 made last, and today's appointment was not in it."""
    harness = live_harness
    anna, context, page = await therapist_logs_in(harness, chromium)
    # The browser's "today" is the real one, not the test's clock.
    now = datetime.now(UTC)
    made_at = harness.clock.now()
    async with harness.app[DB_ENGINE].begin() as conn:

        async def consult(scheduled_at: datetime | None) -> uuid.UUID:
            made = await create_consult(
                conn, therapist_id=anna.account_id, now=made_at, scheduled_at=scheduled_at
            )
            return made.id

        today = await consult(now + timedelta(minutes=30))
        ahead = [await consult(now + timedelta(days=1, hours=i)) for i in range(100)]
        earlier = [await consult(None) for _ in range(150)]
    await page.reload()
    upcoming = page.locator("#list-groups table").first.locator("tbody tr")
    rows = page.locator("#list-groups tbody tr")
    older = page.get_by_role("button", name="Older consults")
    await expect(upcoming).to_have_count(101)
    # Soonest first under "Today and upcoming": today's appointment heads it.
    await expect(upcoming.first).to_have_attribute("data-consult", str(today))
    await expect(page.get_by_role("heading", name="Today and upcoming")).to_be_visible()
    # Page two ends with 99 earlier consults; the rest wait for the button.
    await expect(rows).to_have_count(200)
    await expect(older).to_be_visible()
    await assert_accessible(page, "therapist-consults-older")

    async with page.expect_response(lambda r: "/api/consults?before=" in r.url) as answer:
        await older.click()
    assert (await answer.value).status == 200
    await expect(rows).to_have_count(251)
    await expect(older).to_be_hidden()
    shown: list[str] = await rows.evaluate_all("(rows) => rows.map((row) => row.dataset.consult)")
    assert sorted(shown) == sorted(str(c) for c in [today, *ahead, *earlier])
    await screenshot(page, "therapist-consults-all")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)
