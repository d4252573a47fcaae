"""The therapist's recordings on the dashboard, a page at a time: the first
50, then "Older recordings" adds the rest and goes away."""

from __future__ import annotations

import pytest
from playwright.async_api import Browser, expect

from tests.support.axe import assert_accessible
from tests.support.browser import (
    EXPECTED_HTTP_ERRORS,
    ScreenshotSaver,
    assert_no_browser_errors,
    create_consult,
    logs_in,
    therapist_logs_in,
)
from tests.support.harness import Harness, stored_recording

pytestmark = pytest.mark.browser


async def test_older_recordings_come_a_page_at_a_time(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    harness = live_harness
    anna, context, page = await therapist_logs_in(harness, chromium)
    consult_id, _invite_url = await create_consult(page)
    # Each takes a minute of the test's clock: the login session runs out
    # meanwhile (15 minutes idle), so the therapist logs in again.
    made = [await stored_recording(harness, consult_id, b"media") for _ in range(53)]
    await page.reload()
    await page.wait_for_url("**/login?**")
    await logs_in(harness, page, anna)

    rows = page.locator("#recordings tbody tr")
    older = page.get_by_role("button", name="Older recordings")
    await expect(rows).to_have_count(50)
    await expect(older).to_be_visible()
    # Newest first: the last one made heads the list.
    await expect(rows.first).to_have_attribute("data-recording", str(made[-1]))
    await assert_accessible(page, "therapist-recordings-older")

    async with page.expect_response(lambda r: "/api/recordings?before=" in r.url) as answer:
        await older.click()
    assert (await answer.value).status == 200
    await expect(rows).to_have_count(53)
    await expect(older).to_be_hidden()
    shown = await rows.evaluate_all("(rows) => rows.map((row) => row.dataset.recording)")
    assert shown == [str(recording) for recording in reversed(made)]
    await screenshot(page, "therapist-recordings-all")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)
