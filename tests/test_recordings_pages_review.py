"""Review of the paged recordings list (``GET /api/recordings`` with
``before``, and the dashboard's "Older recordings"): what it gets wrong.

- A ``before`` naming another therapist's recording (or none) is refused
  with 422 but, unlike every other refusal in server/api/recording_views.py
  (and the other views' refusals of an id that is not the caller's), not
  written to the access log, although docs/recording.md says every list and
  refusal is.

The review's two findings in the dashboard are in
tests/test_browser_recordings_pages.py. A later review (of js/pages.js, the
paged list the recordings share with the consults) found the list's own
error cleared the recordings' delete error: the last test here.
"""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from playwright.async_api import Browser, Route, expect

from audit.schema import access_log
from server.app_keys import DB_ENGINE
from tests.support.harness import Harness, new_consult, stored_recording
from tests.test_browser_recordings_pages import dashboard


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


@pytest.mark.browser
async def test_a_failed_delete_says_so_after_an_older_page_failed_before(
    chromium: Browser, live_harness: Harness
) -> None:
    """PagedList remembers that it said something (told) and clears the
    element once a load works, but the element is shared with the recordings
    list's own errors. 'Older recordings' failed once (told stays true), then
    a delete is refused: the recordings list says why and loads the list
    again, and that load clears the delete's error at once. The therapist
    sees the recording still there and no word why."""
    board = await dashboard(live_harness, chromium)
    page = board.page
    problem = page.locator("#recordings-problem")
    await page.route("**/api/recordings?before=*", lambda route: route.abort())
    await board.older.click()
    await expect(problem).to_have_text("Something went wrong. Please try again.")
    await page.unroute("**/api/recordings?before=*")

    async def refuse(route: Route) -> None:
        if route.request.method == "DELETE":
            await route.fulfill(
                status=500,
                json={"error": {"code": "internal_error", "message": "internal error"}},
            )
        else:
            await route.continue_()

    newest = board.made[-1]
    await page.route(f"**/api/recordings/{newest}", refuse)
    async with page.expect_response(
        lambda r: r.url.endswith("/api/recordings") and r.request.method == "GET"
    ):
        await board.row(newest).get_by_role("button", name="Delete").click()
    await page.wait_for_timeout(500)
    await expect(board.row(newest)).to_have_count(1)
    text = await problem.text_content()
    assert text == "Something went wrong on the server. Please try again.", (
        f"after the refused delete, #recordings-problem says {text!r}"
    )
    await board.context.close()
