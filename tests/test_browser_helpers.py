"""The browser helpers themselves, where a helper can be wrong in a way that
makes other tests flaky.

``create_consult`` once took the consult's id from the list's first row as
soon as the invite box showed. The page shows the box before it loads the
list again, so on a loaded machine (CI, stop 42) the id was the previous
consult's: the appointment-reference test then read no reference and failed.
Here the list's reload is held back on purpose, which makes that race certain.
"""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import Browser, Request, Route

from tests.support.browser import assert_no_browser_errors, create_consult, therapist_logs_in
from tests.support.harness import Harness

pytestmark = pytest.mark.browser


async def test_create_consult_returns_the_consult_it_made_while_the_list_reloads_late(
    chromium: Browser, live_harness: Harness
) -> None:
    _, context, page = await therapist_logs_in(live_harness, chromium)
    first_id, first_url = await create_consult(page)

    async def list_late(route: Route, request: Request) -> None:
        if request.method == "GET":
            await asyncio.sleep(1.5)
        await route.continue_()

    await page.route("**/api/consults", list_late)
    async with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith("/api/consults")
    ) as made:
        second_id, second_url = await create_consult(page)
    answer = await (await made.value).json()
    assert second_id == answer["consult"]["id"] != first_id
    assert second_url == answer["invite_url"] != first_url
    await assert_no_browser_errors(context, allow=[r"status of 401 .*/api/session"])
