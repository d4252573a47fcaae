"""Review of the paged recordings list (``GET /api/recordings`` with
``before``, and the dashboard's "Older recordings"): what it gets wrong.

- A ``before`` naming another therapist's recording (or none) is refused
  with 422 but, unlike every other refusal in server/api/recording_views.py
  (and the other views' refusals of an id that is not the caller's), not
  written to the access log, although docs/recording.md says every list and
  refusal is.
- The dashboard: the list loaded again (after a delete, a new consult, ...)
  while an older page is on its way gets that older page appended to the new
  first page: a recording shown twice.
- The dashboard: deleting a recording of an older page loads only the first
  page again, so the other older recordings shown a moment ago are gone.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import sqlalchemy as sa
from playwright.async_api import Browser, BrowserContext, Page, Request, Route, expect

from audit.schema import access_log
from server.app_keys import DB_ENGINE
from tests.support.browser import (
    EXPECTED_HTTP_ERRORS,
    assert_no_browser_errors,
    create_consult,
    logs_in,
    therapist_logs_in,
)
from tests.support.harness import Harness, new_consult, stored_recording


async def _refused_list_reads(harness: Harness, actor: uuid.UUID) -> int:
    async with harness.app[DB_ENGINE].connect() as conn:
        count: int = (
            await conn.execute(
                sa.select(sa.func.count()).where(
                    access_log.c.action == "recording.list",
                    access_log.c.actor_id == actor,
                    access_log.c.outcome == "refused",
                )
            )
        ).scalar_one()
    return count


@pytest.mark.parametrize("whose", ["another therapist's", "none"])
async def test_a_before_that_is_not_the_callers_recording_is_a_logged_refusal(
    harness: Harness, whose: str
) -> None:
    """As a download of another therapist's recording is logged refused, so
    is a page asked for after it: the attempt names that recording."""
    owner = await new_consult(harness)
    theirs = await stored_recording(harness, owner.consult_id, b"media")
    other = await new_consult(harness, "other@praktijk-noord.example")
    await stored_recording(harness, other.consult_id, b"media")
    cursor = theirs if whose != "none" else uuid.uuid4()
    response = await harness.client.get(f"/api/recordings?before={cursor}")
    assert response.status == 422, await response.text()
    # For comparison: the same recording's download is refused and logged.
    download = await harness.client.get(f"/api/recordings/{theirs}/download")
    assert download.status == 403, await download.text()
    async with harness.app[DB_ENGINE].connect() as conn:
        download_refusals = (
            await conn.execute(
                sa.select(sa.func.count()).where(
                    access_log.c.action == "recording.download",
                    access_log.c.actor_id == other.therapist.account_id,
                    access_log.c.outcome == "refused",
                )
            )
        ).scalar_one()
    assert download_refusals == 1
    assert await _refused_list_reads(harness, other.therapist.account_id) == 1


async def _therapist_with_recordings(
    harness: Harness, chromium: Browser, count: int
) -> tuple[BrowserContext, Page, list[uuid.UUID]]:
    anna, context, page = await therapist_logs_in(harness, chromium)
    consult_id, _invite_url = await create_consult(page)
    made = [await stored_recording(harness, consult_id, b"media") for _ in range(count)]
    # Each took a minute of the test's clock: the session ran out meanwhile.
    await page.reload()
    await page.wait_for_url("**/login?**")
    await logs_in(harness, page, anna)
    return context, page, made


@pytest.mark.browser
async def test_the_list_loaded_again_while_an_older_page_comes_shows_each_once(
    chromium: Browser, live_harness: Harness
) -> None:
    harness = live_harness
    context, page, made = await _therapist_with_recordings(harness, chromium, 53)
    rows = page.locator("#recordings tbody tr")
    older = page.get_by_role("button", name="Older recordings")
    await expect(rows).to_have_count(50)

    held: asyncio.Future[Route] = asyncio.get_running_loop().create_future()

    async def hold(route: Route, request: Request) -> None:
        # The first older page is held; the page may ask again (for the next
        # page of the list as loaded anew), and that request goes through.
        if held.done():
            await route.continue_()
        else:
            held.set_result(route)

    await page.route("**/api/recordings?before=*", hold)
    await older.click()
    route = await asyncio.wait_for(held, 10)
    # Meanwhile the therapist deletes the newest recording: the list is loaded again.
    newest = page.locator(f'#recordings tr[data-recording="{made[-1]}"]')
    async with page.expect_response(
        lambda r: r.url.endswith("/api/recordings") and r.request.method == "GET"
    ):
        await newest.get_by_role("button", name="Delete").click()
    await expect(rows.first).to_have_attribute("data-recording", str(made[-2]))
    await route.continue_()
    await expect(older).to_be_hidden()
    await asyncio.sleep(0.5)
    shown = await rows.evaluate_all("(rows) => rows.map((row) => row.dataset.recording)")
    twice = sorted({recording for recording in shown if shown.count(recording) > 1})
    assert not twice, f"shown twice: {twice}"
    assert shown == [str(recording) for recording in reversed(made[:-1])]
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


@pytest.mark.browser
async def test_deleting_an_older_recording_keeps_the_others_shown(
    chromium: Browser, live_harness: Harness
) -> None:
    harness = live_harness
    context, page, made = await _therapist_with_recordings(harness, chromium, 53)
    rows = page.locator("#recordings tbody tr")
    older = page.get_by_role("button", name="Older recordings")
    await expect(rows).to_have_count(50)
    await older.click()
    await expect(rows).to_have_count(53)
    oldest = page.locator(f'#recordings tr[data-recording="{made[0]}"]')
    async with page.expect_response(
        lambda r: r.url.endswith("/api/recordings") and r.request.method == "GET"
    ):
        await oldest.get_by_role("button", name="Delete").click()
    await asyncio.sleep(0.5)
    shown = await rows.evaluate_all("(rows) => rows.map((row) => row.dataset.recording)")
    # The two other recordings of the older page were on screen; they still exist.
    assert shown == [str(recording) for recording in reversed(made[1:])]
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)
