"""The therapist's recordings on the dashboard, a page at a time: the first
50, then "Older recordings" adds the rest and goes away; a reload of the
list (after a delete, a new consult) keeps the therapist's place."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from playwright.async_api import Browser, BrowserContext, Locator, Page, Request, Route, expect

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


class Dashboard:
    """A therapist's dashboard showing the first page of 53 recordings."""

    def __init__(self, context: BrowserContext, page: Page, made: list[uuid.UUID]) -> None:
        self.context = context
        self.page = page
        # Oldest first.
        self.made = made
        self.rows = page.locator("#recordings tbody tr")
        self.older = page.get_by_role("button", name="Older recordings")

    def row(self, recording: uuid.UUID) -> Locator:
        return self.page.locator(f'#recordings tr[data-recording="{recording}"]')

    async def shown(self) -> list[str]:
        shown: list[str] = await self.rows.evaluate_all(
            "(rows) => rows.map((row) => row.dataset.recording)"
        )
        return shown


async def dashboard(harness: Harness, chromium: Browser) -> Dashboard:
    anna, context, page = await therapist_logs_in(harness, chromium)
    consult_id, _invite_url = await create_consult(page)
    # Each takes a minute of the test's clock: the login session runs out
    # meanwhile (15 minutes idle), so the therapist logs in again.
    made = [await stored_recording(harness, consult_id, b"media") for _ in range(53)]
    await page.reload()
    await page.wait_for_url("**/login?**")
    await logs_in(harness, page, anna)
    board = Dashboard(context, page, made)
    await expect(board.rows).to_have_count(50)
    return board


async def test_older_recordings_come_a_page_at_a_time(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    board = await dashboard(live_harness, chromium)
    page, rows, older, made = board.page, board.rows, board.older, board.made
    await expect(older).to_be_visible()
    # Newest first: the last one made heads the list.
    await expect(rows.first).to_have_attribute("data-recording", str(made[-1]))
    await assert_accessible(page, "therapist-recordings-older")

    async with page.expect_response(lambda r: "/api/recordings?before=" in r.url) as answer:
        await older.click()
    assert (await answer.value).status == 200
    await expect(rows).to_have_count(53)
    await expect(older).to_be_hidden()
    assert await board.shown() == [str(recording) for recording in reversed(made)]
    await screenshot(page, "therapist-recordings-all")
    await assert_no_browser_errors(board.context, allow=EXPECTED_HTTP_ERRORS)


async def test_the_list_loaded_again_while_an_older_page_comes_shows_each_once(
    chromium: Browser, live_harness: Harness
) -> None:
    """Found in review: the list loaded again (after a delete, a new consult)
    while an older page was on its way got that older page appended to the
    new first page: a recording shown twice."""
    board = await dashboard(live_harness, chromium)
    page, made = board.page, board.made
    held: asyncio.Future[Route] = asyncio.get_running_loop().create_future()

    async def hold(route: Route, request: Request) -> None:
        # The first older page is held; the page may ask again (for the next
        # page of the list as loaded anew), and that request goes through.
        if held.done():
            await route.continue_()
        else:
            held.set_result(route)

    await page.route("**/api/recordings?before=*", hold)
    await board.older.click()
    route = await asyncio.wait_for(held, 10)
    # Meanwhile the therapist deletes the newest recording: the list is loaded again.
    async with page.expect_response(
        lambda r: r.url.endswith("/api/recordings") and r.request.method == "GET"
    ):
        await board.row(made[-1]).get_by_role("button", name="Delete").click()
    await expect(board.rows.first).to_have_attribute("data-recording", str(made[-2]))
    await route.continue_()
    await expect(board.older).to_be_hidden()
    await asyncio.sleep(0.5)
    shown = await board.shown()
    twice = sorted({recording for recording in shown if shown.count(recording) > 1})
    assert not twice, f"shown twice: {twice}"
    assert shown == [str(recording) for recording in reversed(made[:-1])]
    await assert_no_browser_errors(board.context, allow=EXPECTED_HTTP_ERRORS)


async def test_deleting_an_older_recording_keeps_the_others_shown(
    chromium: Browser, live_harness: Harness
) -> None:
    """Found in review: deleting a recording of an older page loaded only the
    first page again, so the other older recordings shown a moment ago were
    gone."""
    board = await dashboard(live_harness, chromium)
    page, made = board.page, board.made
    await board.older.click()
    await expect(board.rows).to_have_count(53)
    async with page.expect_response(
        lambda r: r.url.endswith("/api/recordings") and r.request.method == "GET"
    ):
        await board.row(made[0]).get_by_role("button", name="Delete").click()
    await asyncio.sleep(0.5)
    # The two other recordings of the older page were on screen; they still exist.
    assert await board.shown() == [str(recording) for recording in reversed(made[1:])]
    await assert_no_browser_errors(board.context, allow=EXPECTED_HTTP_ERRORS)
