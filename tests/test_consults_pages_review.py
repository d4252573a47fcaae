"""The consults list's paging on the dashboard under a hurried or unlucky
user: found in review of 1e962ff, each failing before the fix (in
js/pages.js, shared with the recordings list, which had them all): a double
click or a reload overtaken by another adds no page twice and loses no
consult, the keyboard keeps its place, and errors are the page's own words
and go once the list loads again."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import timedelta

import pytest
from playwright.async_api import Browser, BrowserContext, Locator, Page, Route, expect

from audit.consults import create_consult
from server.app_keys import DB_ENGINE
from tests.support.browser import therapist_logs_in
from tests.support.harness import Harness


async def _earlier_consults(harness: Harness, therapist_id: uuid.UUID, count: int) -> list[str]:
    """``count`` consults of the therapist, all made well before today."""
    made_at = harness.clock.now() - timedelta(days=30)
    ids = []
    async with harness.app[DB_ENGINE].begin() as conn:
        for i in range(count):
            made = await create_consult(
                conn, therapist_id=therapist_id, now=made_at - timedelta(minutes=i)
            )
            ids.append(str(made.id))
    return ids


@dataclass
class _Board:
    """A therapist's dashboard showing the first 100 of their earlier consults."""

    context: BrowserContext
    page: Page
    earlier: list[str]
    rows: Locator
    older: Locator
    problem: Locator


async def _board(harness: Harness, chromium: Browser, count: int) -> _Board:
    anna, context, page = await therapist_logs_in(harness, chromium)
    earlier = await _earlier_consults(harness, anna.account_id, count)
    await page.reload()
    board = _Board(
        context,
        page,
        earlier,
        page.locator("#list-groups tbody tr"),
        page.locator("#consults-older"),
        page.locator("#consults-problem"),
    )
    await expect(board.rows).to_have_count(100)
    return board


async def _shown(page: Page) -> list[str]:
    return await page.locator("#list-groups tbody tr").evaluate_all(
        "(rows) => rows.map((row) => row.dataset.consult)"
    )


@pytest.mark.browser
async def test_double_click_on_older_consults_while_the_list_reloads_shows_no_row_twice(
    chromium: Browser, live_harness: Harness
) -> None:
    """Creating a consult reloads the list; 'Older consults' clicked twice
    meanwhile (a double click, the reload slow) must add the next page once.
    Both clicks wait for the same load, then both fetch the page after the
    same next_before, and both append it."""
    board = await _board(live_harness, chromium, 150)
    context, page, older = board.context, board.page, board.older
    await expect(older).to_be_visible()

    async def slow_first_page(route: Route) -> None:
        if route.request.method == "GET":
            await asyncio.sleep(1.5)
        await route.continue_()

    await page.route("**/api/consults", slow_first_page)
    async with page.expect_response(
        lambda r: r.url.endswith("/api/consults") and r.request.method == "POST"
    ):
        await page.click("#new-button")
    await older.dblclick()
    await expect(older).to_be_hidden(timeout=10_000)
    await page.wait_for_timeout(1000)
    shown = await _shown(page)
    duplicated = sorted({c for c in shown if shown.count(c) > 1})
    assert not duplicated, (
        f"{len(shown)} rows shown for 151 consults; {len(duplicated)} consults shown twice"
    )
    assert len(shown) == 151
    await context.close()


@pytest.mark.browser
@pytest.mark.parametrize(
    ("consults", "shown", "more", "focus"),
    [
        pytest.param(250, 200, True, "consults-older", id="more-pages-left"),
        pytest.param(150, 150, False, "list-groups", id="the-last-page"),
    ],
)
async def test_keyboard_focus_after_a_page_is_added(
    chromium: Browser, live_harness: Harness, consults: int, shown: int, more: bool, focus: str
) -> None:
    """A keyboard user presses 'Older consults': while more pages remain the
    button keeps the focus; on the last page the focus goes to the list. The
    button is disabled while the page loads, and Chrome moves the focus off
    a disabled button, so the user is thrown back to the page's start."""
    board = await _board(live_harness, chromium, consults)
    context, page, rows, older = board.context, board.page, board.rows, board.older
    await older.focus()
    await page.keyboard.press("Enter")
    await expect(rows).to_have_count(shown)
    if more:
        await expect(older).to_be_visible()
    else:
        await expect(older).to_be_hidden()
    focused = await page.evaluate(
        "document.activeElement && (document.activeElement.id || document.activeElement.tagName)"
    )
    assert focused == focus, f"after a page was added the focus is on {focused!r}"
    await context.close()


@pytest.mark.browser
async def test_older_consults_clicked_during_a_reload_that_is_superseded_loses_no_consult(
    chromium: Browser, live_harness: Harness
) -> None:
    """'Older consults' waits for the load on its way (the reload after a new
    consult), then reads its next_before. When another load began meanwhile
    (a consult ended from the list), the page is still asked after the list
    as it was before both, and appended to the list the second load shows:
    the consult that the new one pushed onto the next page is never shown,
    and the button is gone."""
    board = await _board(live_harness, chromium, 150)
    context, page, earlier, older = board.context, board.page, board.earlier, board.older
    await expect(older).to_be_visible()

    first_pages = 0

    async def slow(route: Route) -> None:
        nonlocal first_pages
        if route.request.method == "GET":
            if "before=" in route.request.url:
                await asyncio.sleep(2.5)
            else:
                first_pages += 1
                await asyncio.sleep(1.0 if first_pages == 1 else 2.0)
        await route.continue_()

    await page.route("**/api/consults*", slow)
    async with page.expect_response(
        lambda r: r.url.endswith("/api/consults") and r.request.method == "POST"
    ) as answer:
        await page.click("#new-button")
    created = [(await (await answer.value).json())["consult"]["id"]]
    # While that reload is on its way: the next page, and a consult ended
    # from the list (which loads the list again).
    await older.click()
    async with page.expect_response(lambda r: r.url.endswith("/end")):
        await page.locator(f'tr[data-consult="{earlier[4]}"] button.danger').click()
    await page.wait_for_timeout(5000)
    shown = await _shown(page)
    missing = [c for c in [*created, *earlier] if c not in shown]
    hidden = await older.is_hidden()
    assert not (missing and hidden), (
        f"{len(shown)} of 151 consults shown, 'Older consults' gone; never shown: {missing}"
        f" (the last of the list as first loaded: {missing == [earlier[99]]})"
    )
    await context.close()


@pytest.mark.browser
async def test_the_older_consults_error_goes_once_the_list_is_loaded_again(
    chromium: Browser, live_harness: Harness
) -> None:
    """A failed 'Older consults' says so under the list; the list loaded again
    afterwards (a new consult) is whole and fine, but the error stays, as if
    the list were still broken: only a later click on the button clears it."""
    board = await _board(live_harness, chromium, 150)
    context, page, rows, older, problem = (
        board.context,
        board.page,
        board.rows,
        board.older,
        board.problem,
    )
    await page.route("**/api/consults?before=*", lambda route: route.abort())
    await older.click()
    await expect(problem).not_to_be_empty()
    await page.unroute("**/api/consults?before=*")
    async with page.expect_response(
        lambda r: r.url.endswith("/api/consults") and r.request.method == "GET"
    ):
        await page.click("#new-button")
    await expect(rows).to_have_count(100)
    await page.wait_for_timeout(500)
    text = await problem.text_content()
    assert not text, f"after the list loaded again, #consults-problem still says {text!r}"
    await context.close()


@pytest.mark.browser
async def test_older_consults_without_a_connection_says_so_in_the_pages_language(
    chromium: Browser, live_harness: Harness
) -> None:
    """No connection on 'Older consults': the error under the list is the
    browser's own English 'Failed to fetch' (the key apiError.undefined with
    the exception's text as fallback), not the app's offline message, and it
    stays English when the page is switched to Dutch."""
    board = await _board(live_harness, chromium, 150)
    context, page, problem = board.context, board.page, board.problem
    await page.route("**/api/consults?before=*", lambda route: route.abort())
    await page.locator("#consults-older").click()
    await expect(problem).not_to_be_empty()
    await page.select_option("#language", "nl")
    await expect(page.locator("#consults-older")).to_have_text("Oudere consulten")
    text = await problem.text_content()
    key = await problem.get_attribute("data-i18n")
    assert text != "Failed to fetch", f"in Dutch the error says {text!r} (data-i18n={key!r})"
    await context.close()
