"""A therapist's practice day in real Chromium (desktop, 1280x800), from a
review: each test shows a defect the therapist meets, and fails on the code
as it was when the review was made.

The server's clock is the harness's manual clock; the page's is Playwright's,
paused, and the tests move both by the same steps (never by sleeping).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
from playwright.async_api import Browser, BrowserContext, Page, Response, Route, expect

from tests.support.axe import assert_accessible
from tests.support.browser import (
    EXPECTED_HTTP_ERRORS,
    assert_no_browser_errors,
    create_consult,
    open_consult,
    therapist_logs_in,
)
from tests.support.databases import copy_sqlite_template
from tests.support.harness import Harness, Sockets
from tests.support.ports import unused_port
from tests.support.settings import SettingsFactory

pytestmark = pytest.mark.browser


@pytest.fixture
def sqlite_settings(
    make_settings: SettingsFactory,
    sqlite_template: Path,
    data_dir: Path,
    request: pytest.FixtureRequest,
) -> Any:
    """The browser harness's settings, with e-mail invitations set up: to a
    mail server on this machine that is not running (nothing listens on the
    port), so every invitation fails with "unreachable" at once; and a
    ``settings`` marker's."""
    copy_sqlite_template(sqlite_template, data_dir)
    marker = request.node.get_closest_marker("settings")
    return make_settings(
        smtp_host="127.0.0.1",
        smtp_port=unused_port(),
        smtp_security="none",
        smtp_from_address="Praktijk Noord <video@praktijk-noord.example>",
        smtp_timeout_s=5,
        **({} if marker is None else marker.kwargs),
    )


def keep_alive(response: Response) -> bool:
    return urlsplit(response.url).path == "/api/session/touch"


# The browser contexts' time zone (tests/support/browser.py, new_context).
ZONE = ZoneInfo("Europe/Amsterdam")


async def pause_page_clock_at_server_time(page: Page, harness: Harness, later_s: int) -> None:
    """Both clocks ``later_s`` on (the page's was installed at the server's
    time, and ran since), the page's standing still: both move only when told."""
    harness.clock.advance(later_s)
    await page.clock.pause_at(harness.clock.now())


async def both_clocks_run_for(page: Page, harness: Harness, seconds: int) -> None:
    harness.clock.advance(seconds)
    await page.clock.run_for(seconds * 1000)


async def dashboard_on_the_servers_time(
    harness: Harness, chromium: Browser
) -> tuple[BrowserContext, Page]:
    """A therapist at the dashboard, the page's clock standing still at the
    server's time, 3 seconds after the page's first keep-alive was answered
    (before its clock stands still and jumps: a jump runs the page's timers,
    not its network)."""
    _anna, context, page = await therapist_logs_in(harness, chromium)
    await page.clock.install(time=harness.clock.now())
    async with page.expect_response(keep_alive):
        await page.reload()
    await expect(page.locator("#dashboard")).to_be_visible()
    await pause_page_clock_at_server_time(page, harness, 3)
    return context, page


# --- the idle timeout -------------------------------------------------------------


async def test_stay_logged_in_while_the_countdown_still_runs_keeps_the_therapist_logged_in(
    chromium: Browser, live_harness: Harness
) -> None:
    """The page counts any API request as a touch of the server's idle clock
    (idle.js ``touched()``), but the server marks a session seen at most once
    a minute (server/auth/sessions.py ``TOUCH_EVERY_S``): a therapist who
    made a consult a little after logging in, and clicked in the page 29
    seconds later, gets the 90-second warning; with the countdown still
    saying 50-odd seconds, "Stay logged in" lands on the login page."""
    harness = live_harness
    context, page = await dashboard_on_the_servers_time(harness, chromium)

    # 25 seconds in, a consult for later today (the click is too soon after
    # the page's own requests to touch the server; the POST marks nothing:
    # the session was marked at login, less than a minute ago).
    await both_clocks_run_for(page, harness, 25)
    await page.fill("#display-name", "Mevr. de Vries")
    async with page.expect_response(
        lambda r: r.request.method == "POST" and urlsplit(r.url).path == "/api/consults"
    ):
        await page.click("#new-button")
    await expect(page.locator("#invite-box")).to_be_visible()
    # 29 seconds later she clicks in the page once more, then turns to her
    # paperwork.
    await both_clocks_run_for(page, harness, 29)
    async with page.expect_response(keep_alive):  # 54 s since the last one
        await page.locator("#list-groups").click()

    # The warning comes 90 seconds before the page's timeout ...
    await both_clocks_run_for(page, harness, 15 * 60 - 90 + 1)
    warning = page.locator("#idle-warning")
    await expect(warning).to_be_visible()
    # ... and 50 seconds into it, with 40 seconds still to go, she clicks.
    await both_clocks_run_for(page, harness, 50)
    await expect(page.locator("#idle-text")).to_contain_text("logged out in 3")
    countdown = await page.locator("#idle-text").inner_text()
    async with page.expect_response(lambda r: r.url.endswith("/api/session/touch")) as touch:
        await page.get_by_role("button", name="Stay logged in").click()
    status = (await touch.value).status
    assert status == 204, (
        f"'Stay logged in', clicked with the countdown at {countdown!r}, was answered "
        f"{status}: the "
        "server's session had timed out already, and the page goes to the login page"
    )
    await expect(warning).to_be_hidden()
    assert urlsplit(page.url).path == "/app"
    # The page's clock runs again (settling the page waits for a timer).
    await page.clock.resume()
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


async def test_stay_logged_in_on_a_slow_line_does_not_bring_the_warning_back(
    chromium: Browser, live_harness: Harness
) -> None:
    """Found by CI (2026-12-07, 21:25): "Stay logged in" hides the warning at
    once, but until its keep-alive is answered the page still counts from
    the server's old mark, so its once-a-second check shows the warning again;
    and nothing hid it after the answer came. On a line slower than a second
    the therapist saw the warning come back and stay, its countdown frozen."""
    harness = live_harness
    context, page = await dashboard_on_the_servers_time(harness, chromium)
    await both_clocks_run_for(page, harness, 15 * 60 - 90 + 1)
    warning = page.locator("#idle-warning")
    await expect(warning).to_be_visible()

    # The keep-alive is held on its way for two seconds of the page's time.
    answer = asyncio.Event()

    async def slow_line(route: Route) -> None:
        await answer.wait()
        await route.continue_()

    await page.route("**/api/session/touch", slow_line)
    async with page.expect_response(keep_alive) as touch:
        await page.get_by_role("button", name="Stay logged in").click()
        await both_clocks_run_for(page, harness, 2)
        answer.set()
    assert (await touch.value).status == 204
    await both_clocks_run_for(page, harness, 1)
    await expect(warning).to_be_hidden()
    await page.clock.resume()
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


# --- the invitation by e-mail -----------------------------------------------------


async def mail_an_invitation(page: Page, address: str = "jan.jansen@example.nl") -> None:
    """Create a consult whose link is mailed to ``address``; wait for the outcome."""
    await page.fill("#display-name", "J. Jansen")
    await page.fill("#patient-email", address)
    async with page.expect_response(
        lambda r: r.request.method == "POST" and urlsplit(r.url).path == "/api/consults"
    ) as made:
        await page.click("#new-button")
    assert (await made.value).status == 201
    await expect(page.locator("#mail-status")).to_be_visible()


@pytest.mark.settings(sessions_absolute_timeout_s=1200)
async def test_the_end_of_the_login_itself_is_told_ten_minutes_before(
    chromium: Browser, live_harness: Harness
) -> None:
    """A session ends ``sessions.absolute_timeout_s`` (12 hours) after its
    login whatever happens, and a call still open then is cut: the page
    counted only the idle timeout (``absolute_end_at`` went unread), so a
    therapist at the end of a long day lost their call without a word. Here
    the login lasts 20 minutes: ten before its end the page says when."""
    harness = live_harness
    context, page = await dashboard_on_the_servers_time(harness, chromium)
    warning = page.locator("#session-end-warning")
    await both_clocks_run_for(page, harness, 60)
    await expect(warning).to_be_hidden()
    # 11 minutes on (the idle warning not yet due: 13.5 minutes).
    await both_clocks_run_for(page, harness, 10 * 60)
    await expect(warning).to_be_visible()
    await expect(page.locator("#idle-warning")).to_be_hidden()
    ends = (harness.clock.now() + timedelta(minutes=9)).astimezone(ZONE)
    text = page.locator("#session-end-text")
    await expect(text).to_contain_text("Your login runs out at")
    # The time it says is the server's end of the session, give or take the
    # seconds the login took (on a 12- or 24-hour clock, as the page's locale has it).
    shown = (await text.inner_text()).split(" at ")[1][:5]
    end_minutes = {
        (ends + timedelta(seconds=delta)).strftime(form)
        for delta in range(-90, 91, 30)
        for form in ("%H:%M", "%I:%M")
    }
    assert shown in end_minutes, (shown, sorted(end_minutes))
    # The page's clock runs again (axe's checks wait for timers).
    await page.clock.resume()
    await assert_accessible(page, "the end of the login announced")
    # "Log in again now": the logout, then the login page.
    await page.get_by_role("button", name="Log in again now").click()
    await page.wait_for_url("**/login*")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


async def test_in_dutch_a_failed_invitation_mail_says_why_in_dutch(
    chromium: Browser, live_harness: Harness
) -> None:
    """The page puts the server's English reason into the Dutch sentence
    (appointments.js ``showMailOutcome``: ``outcome.error.message``), though
    the answer names the problem by its code (``email_unreachable``)."""
    _anna, context, page = await therapist_logs_in(live_harness, chromium)
    await page.select_option("#language", "nl")
    await expect(page.locator("#dashboard h1")).to_have_text("Nieuw consult")
    await mail_an_invitation(page)
    status = page.locator("#mail-status")
    await expect(status).to_contain_text("De uitnodiging is niet verstuurd")
    text = await status.inner_text()
    assert "mail server" not in text, (
        f"the Dutch page tells why the invitation was not sent in English: {text!r}"
    )
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


async def test_the_invitation_mail_outcome_follows_a_change_of_language(
    chromium: Browser, live_harness: Harness
) -> None:
    """docs/browser-app.md, Languages: "A change of language renders
    everything on screen again, messages already shown included". The mail's
    outcome is set as finished text (appointments.js ``showMailOutcome``,
    ``element.textContent = t(...)``, not ``say()``) and stays English."""
    _anna, context, page = await therapist_logs_in(live_harness, chromium)
    await mail_an_invitation(page)
    status = page.locator("#mail-status")
    await expect(status).to_contain_text("The invitation was not sent")
    await page.select_option("#language", "nl")
    await expect(page.locator("#dashboard h1")).to_have_text("Nieuw consult")
    await expect(page.locator("#copy-invite")).to_have_text("Link kopiëren")
    text = await status.inner_text()
    assert "De uitnodiging is niet verstuurd" in text, (
        f"after switching to Dutch the mail's outcome still reads {text!r}"
    )
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


async def test_an_address_the_server_refuses_is_named_in_the_forms_error(
    chromium: Browser, live_harness: Harness
) -> None:
    """An address the browser's e-mail field takes (no dot in the domain) is
    refused by the server (server/api/invite_mailing.py ``_ADDRESS``) with
    ``invalid_field``; the page's only words for that code
    (i18n_app.js ``apiError.invalid_field``) send the therapist to the name
    and the appointment reference, never to the address she mistyped."""
    _anna, context, page = await therapist_logs_in(live_harness, chromium)
    await page.fill("#display-name", "J. Jansen")
    await page.fill("#patient-email", "jan.jansen@praktijknoord")
    async with page.expect_response(
        lambda r: r.request.method == "POST" and urlsplit(r.url).path == "/api/consults"
    ) as made:
        await page.click("#new-button")
    answer = await made.value
    assert answer.status == 422
    error = page.locator("#new-error")
    await expect(error).not_to_be_empty()
    text = await error.inner_text()
    assert "e-mail" in text.lower(), (
        f"the server refused the patient's e-mail address; the form says: {text!r}"
    )
    await assert_no_browser_errors(context, allow=[*EXPECTED_HTTP_ERRORS, r"status of 422"])


# --- the waiting room -------------------------------------------------------------


async def patient_waits_in_the_opened_consult(
    harness: Harness, page: Page, sockets: Sockets, name: str = "J. Jansen"
) -> None:
    """The therapist opens a new consult; the patient (a plain socket with
    consent, like the patient's page) enters its waiting room."""
    consult_id, url = await create_consult(page, name=name)
    await open_consult(page, consult_id)
    token = urlsplit(url).path.rsplit("/", 1)[-1]
    await sockets.patient(token)
    await expect(page.locator("#waiting-notice")).to_be_visible()


async def test_the_waiting_patient_notice_follows_a_change_of_language(
    chromium: Browser, live_harness: Harness, sqlite_sockets: Sockets
) -> None:
    """docs/browser-app.md, Languages: a change of language renders every
    message already shown again. The notice that the patient waits is set as
    finished text (app.js ``patientWaiting``: ``textContent = t(...)``), so
    it stays English beside Dutch "Toelaten" and "Weigeren"."""
    _anna, context, page = await therapist_logs_in(live_harness, chromium)
    await patient_waits_in_the_opened_consult(live_harness, page, sqlite_sockets)
    await expect(page.locator("#waiting-text")).to_have_text("J. Jansen is in the waiting room.")
    await page.select_option("#language", "nl")
    await expect(page.locator("#admit")).to_have_text("Toelaten")
    text = await page.locator("#waiting-text").inner_text()
    assert text == "J. Jansen zit in de wachtkamer.", (
        f"after switching to Dutch the waiting-room notice still reads {text!r}"
    )
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


async def test_after_admitting_the_tab_title_is_in_the_pages_language(
    chromium: Browser, live_harness: Harness, sqlite_sockets: Sockets
) -> None:
    """While a patient waits, the tab title blinks; it keeps the title it
    had when the blinking began (app.js ``patientWaiting``: ``original``)
    and puts that back at admission, so a therapist who switched to Dutch
    meanwhile is left with the English title for the rest of the day."""
    _anna, context, page = await therapist_logs_in(live_harness, chromium)
    await patient_waits_in_the_opened_consult(live_harness, page, sqlite_sockets)
    await page.select_option("#language", "nl")
    await expect(page.locator("#admit")).to_have_text("Toelaten")
    await page.get_by_role("button", name="Toelaten").click()
    await expect(page.locator("#waiting-notice")).to_be_hidden()
    title = await page.title()
    dutch = "Consulten \u2013 videoconsult"
    assert title == dutch, f"the Dutch page's tab is titled {title!r}"
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


# --- keyboard only ----------------------------------------------------------------


async def test_revoking_a_link_with_the_keyboard_keeps_the_keyboards_place(
    chromium: Browser, live_harness: Harness
) -> None:
    """A keyboard user revokes a link from the list: the page draws the whole
    list anew (app.js ``revoke`` -> ``linkNow`` -> ``renderList``:
    ``groups.replaceChildren()``), the focused button goes with it and the
    focus falls back to the top of the document; the next Tab starts over at
    the language switch. (pages.js keeps the keyboard's place for the same
    list's "Older consults".)"""
    _anna, context, page = await therapist_logs_in(live_harness, chromium)
    consult_id, _url = await create_consult(page, name="J. Jansen")
    revoke = page.locator(f'tr[data-consult="{consult_id}"] button', has_text="Revoke link")
    await revoke.focus()
    async with page.expect_response(
        lambda r: r.request.method == "DELETE" and r.url.endswith(f"/{consult_id}/invite")
    ):
        await page.keyboard.press("Enter")  # the confirmation is accepted
    row = page.locator(f'tr[data-consult="{consult_id}"]')
    await expect(row).to_contain_text("Link revoked")
    focused = await page.evaluate(
        "() => { const e = document.activeElement; return e ?"
        " `${e.tagName.toLowerCase()}#${e.id} ${e.textContent.trim().slice(0, 30)}` : null; }"
    )
    inside = await page.evaluate(
        "() => document.getElementById('list-groups').contains(document.activeElement)"
    )
    assert inside, f"after revoking a link with the keyboard the focus is on {focused!r}"
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


# --- a new link -------------------------------------------------------------------


async def test_a_new_link_for_a_consult_not_started_warns_that_a_waiting_patient_goes(
    chromium: Browser, live_harness: Harness
) -> None:
    """From the same review's judgment calls: "New link" (and "E-mail new
    link") on a consult that has not started asked nothing, though a new
    link sends away a patient waiting with the old one (the server revokes
    it and closes the waiting room's sockets), and a therapist re-sends a
    link just when "the patient did not get it": perhaps already waiting.
    Only a running consult's new link was confirmed (app.js ``reissue``)."""
    harness = live_harness
    _anna, context, page = await therapist_logs_in(harness, chromium)
    consult_id, _url = await create_consult(page, name="J. Jansen")
    asked: list[str] = []
    # therapist_logs_in's page accepts every dialog; this one only listens.
    page.on("dialog", lambda dialog: asked.append(dialog.message))
    row = page.locator(f'tr[data-consult="{consult_id}"]')
    async with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith(f"/{consult_id}/invite")
    ):
        await row.get_by_role("button", name="New link", exact=True).click()
    assert asked, "a new link for a consult that has not started was made without a word"
    assert "waiting room" in asked[0], asked[0]
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)
