"""Review: a patient who joins from the invite link on a phone (a small
touch screen, 360 x 740, or held sideways), as an anxious, non-technical
user would. Each test here shows a defect the patient meets; it fails on the
code as reviewed, for the reason its docstring gives.

The phone is Debian's Chromium as in the other browser tests, in a context
with ``is_mobile`` and ``has_touch`` (tests/support/browser.py's
``new_context`` makes desktop contexts only).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from playwright.async_api import Browser, BrowserContext, Page, Route, ViewportSize, expect

from server.app_keys import SETTINGS
from tests.support.browser import (
    MEDIA_TIMEOUT_MS,
    create_consult,
    open_consult,
    patient_joins,
    therapist_logs_in,
    wait_for_remote_video,
)
from tests.support.harness import Harness

pytestmark = pytest.mark.browser

SMALL_PHONE: ViewportSize = {"width": 360, "height": 740}
SIDEWAYS_PHONE: ViewportSize = {"width": 740, "height": 360}
SHORT_PHONE: ViewportSize = {"width": 360, "height": 640}
# The browser contexts' time zone, as tests/support/browser.py has it.
ZONE = ZoneInfo("Europe/Amsterdam")


async def phone_context(
    browser: Browser,
    harness: Harness,
    *,
    viewport: ViewportSize = SMALL_PHONE,
    locale: str = "en-GB",
) -> BrowserContext:
    """A phone: small touch screen, camera and microphone allowed."""
    context = await browser.new_context(
        base_url=harness.origin,
        viewport=viewport,
        is_mobile=True,
        has_touch=True,
        locale=locale,
        timezone_id="Europe/Amsterdam",
    )
    await context.grant_permissions(["camera", "microphone"], origin=harness.origin)
    return context


async def phone_in_a_call(
    harness: Harness, chromium: Browser, *, viewport: ViewportSize = SMALL_PHONE
) -> tuple[Page, Page]:
    """A therapist (desktop) and a patient (phone) in a running consult."""
    _anna, _therapist_context, therapist = await therapist_logs_in(harness, chromium)
    consult_id, invite_url = await create_consult(therapist)
    await open_consult(therapist, consult_id)
    patient_context = await phone_context(chromium, harness, viewport=viewport)
    patient = await patient_context.new_page()
    await patient.goto(invite_url)
    await patient_joins(patient)
    await expect(therapist.locator("#waiting-notice")).to_be_visible()
    await therapist.click("#admit")
    await wait_for_remote_video(patient)
    await wait_for_remote_video(therapist)
    return therapist, patient


async def phone_at_the_link(
    harness: Harness, chromium: Browser, init_script: str
) -> tuple[Page, Page]:
    """A therapist (desktop) with a consult open, and a phone (running
    ``init_script`` first) at its invite link."""
    _anna, _therapist_context, therapist = await therapist_logs_in(harness, chromium)
    consult_id, invite_url = await create_consult(therapist)
    await open_consult(therapist, consult_id)
    patient_context = await phone_context(chromium, harness)
    await patient_context.add_init_script(init_script)
    patient = await patient_context.new_page()
    await patient.goto(invite_url)
    return therapist, patient


async def agrees_and_joins(patient: Page) -> None:
    """From the device check on: on, the consent box ticked, joined."""
    await patient.tap("#devices-next")
    await patient.tap("#consent-box")
    await patient.tap("#join-button")


MEDIA_STATE = "() => window.videoconsult.call.mediaState()"


async def test_after_leave_and_join_again_the_camera_and_mute_buttons_say_what_is_sent(
    chromium: Browser, live_harness: Harness
) -> None:
    """A patient switches the camera off and mutes, taps Leave (a big red
    button right under them) and confirms, then "Join again". The
    new call starts with camera and microphone on, and the therapist sees and
    hears the patient; but the buttons still say "Camera on" and "Unmute"
    (aria-pressed="true"), so the patient believes they are hidden and muted.

    Cause: join.js ``finish()`` (line 290) stops the old stream and
    ``acquireMedia()`` (line 127) takes a new one with every track enabled,
    but neither resets the buttons ``bindCallControls()`` (ui.js line 10)
    toggled; the buttons keep the old call's state."""
    therapist, patient = await phone_in_a_call(live_harness, chromium)
    await patient.tap("#camera")
    await patient.tap("#mute")
    await expect(therapist.locator("#peer-media")).to_contain_text("camera off")
    await expect(therapist.locator("#peer-media")).to_contain_text("muted")

    await patient.tap("#leave")
    await patient.tap("#leave-confirm-leave")
    await expect(patient.locator("#left")).to_be_visible()
    await patient.tap("#rejoin")
    # The way in again (not patient_joins: the consult is running, so the
    # waiting room may be gone before it is looked at).
    await patient.tap("#intro-next")
    await patient.wait_for_function(
        "() => document.getElementById('preview').videoWidth > 0", timeout=MEDIA_TIMEOUT_MS
    )
    await agrees_and_joins(patient)
    # The consult is running: straight back into the call.
    await expect(patient.locator("#call")).to_be_visible()
    await wait_for_remote_video(therapist)
    # The therapist is told the patient's camera and microphone are on again.
    await expect(therapist.locator("#peer-media")).to_be_hidden()

    sent: dict[str, Any] = await patient.evaluate(MEDIA_STATE)
    camera = patient.locator("#camera")
    mute = patient.locator("#mute")
    camera_says = (await camera.text_content(), await camera.get_attribute("aria-pressed"))
    mute_says = (await mute.text_content(), await mute.get_attribute("aria-pressed"))
    assert (camera_says[1] == "true") == (sent["camera"] == "off"), (
        f"after Join again the camera button says {camera_says[0]!r} "
        f"(aria-pressed={camera_says[1]}) while the page sends camera {sent['camera']!r} "
        "and the therapist sees the patient"
    )
    assert (mute_says[1] == "true") == (sent["microphone"] == "off"), (
        f"after Join again the mute button says {mute_says[0]!r} "
        f"(aria-pressed={mute_says[1]}) while the page sends microphone {sent['microphone']!r}"
    )


async def test_a_tap_on_leave_in_the_call_asks_first_and_stay_keeps_the_call(
    chromium: Browser, live_harness: Harness
) -> None:
    """Leave is a big red button under the patient's thumb, and one tap ended
    the call at once (a bye: the therapist was told the patient left). Now it
    asks first; Stay keeps the call as it was, and Leave leaves."""
    therapist, patient = await phone_in_a_call(live_harness, chromium)
    dialog = patient.locator("#leave-confirm")
    await patient.tap("#leave")
    await expect(dialog).to_be_visible()
    await expect(patient.locator("#leave-confirm-stay")).to_be_focused()
    await expect(patient.get_by_role("dialog", name="Leave the consultation?")).to_be_visible()
    await patient.tap("#leave-confirm-stay")
    await expect(dialog).to_be_hidden()
    await expect(patient.locator("#call")).to_be_visible()
    # The call went on meanwhile: no bye (the therapist's page would say the
    # patient left, its video place waiting), the media still flowing.
    await patient.wait_for_timeout(500)
    await expect(therapist.locator("#remote-waiting")).to_be_hidden()
    await wait_for_remote_video(therapist)
    await wait_for_remote_video(patient)

    await patient.tap("#leave")
    await patient.tap("#leave-confirm-leave")
    await expect(patient.locator("#left")).to_be_visible()
    await expect(dialog).to_be_hidden()


async def test_the_link_opened_in_a_second_tab_says_so_in_the_first(
    chromium: Browser, live_harness: Harness
) -> None:
    """A patient in the waiting room opens the link again in a second tab of
    the same phone: the newer tab takes over, and the first said "You joined
    on another device", which sends a patient looking for another device."""
    therapist, patient = await phone_at_the_link(live_harness, chromium, "")
    await patient_joins(patient)
    await expect(therapist.locator("#waiting-notice")).to_be_visible()
    second = await patient.context.new_page()
    await second.goto(patient.url)
    await patient_joins(second)
    await expect(patient.locator("#replaced")).to_be_visible()
    await expect(patient.get_by_role("heading", level=1)).to_have_text(
        "You joined in another window or on another device"
    )


async def test_the_end_page_reloaded_says_the_consult_ended_not_that_the_link_is_unknown(
    chromium: Browser, live_harness: Harness
) -> None:
    """The therapist ends the consult; the patient's phone reloads the end
    page (a pull-to-refresh, the browser bringing a background tab back, or
    Back from the receipt the end page links to in the same tab). The page
    then says "This link does not work. This link is not known. Check that
    you copied all of it." to a patient who used it a minute ago, and the
    receipt offer is gone with it.

    docs/browser-app.md (Patient, 1) promises that "a tab that had joined with
    the link (before a reload, or reconnecting) says instead that the consult
    has ended". Cause: join.js ``finish()`` (line 291) removes the tab's
    ``videoconsult.joined.<hash>`` mark at every end, "ended" included, so
    after the reload ``linkProblem()`` (line 53) no longer knows the tab had
    joined and shows ``invite.invite_unknown``."""
    therapist, patient = await phone_in_a_call(live_harness, chromium)
    await therapist.click("#end")
    await expect(patient.locator("#ended")).to_be_visible()
    await expect(patient.locator("#receipt-offer")).to_be_visible()

    await patient.reload()
    await expect(patient.locator("#link-problem")).to_be_visible()
    await expect(
        patient.locator("#link-problem-text"),
        "the reloaded end page of a consult this tab took part in",
    ).to_have_text("This consultation has ended.", timeout=5000)


# A phone whose camera takes a few seconds to start (or a permission prompt
# answered after a moment): getUserMedia answers 3 s late.
SLOW_CAMERA = """
if (navigator.mediaDevices) {
  const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = (constraints) =>
    new Promise((done) => setTimeout(done, 3000)).then(() => real(constraints));
}
"""


async def test_continue_before_the_camera_has_started_still_joins_with_camera_and_microphone(
    chromium: Browser, live_harness: Harness
) -> None:
    """On a phone the camera takes a moment to start. The device check's
    "Continue" works at once, so a patient who taps Continue, the consent box
    and "Join the waiting room" quickly joins with no camera and no
    microphone at all: the therapist is told "The patient has no camera. The
    patient has no microphone." and hears nothing, while the camera that
    started a moment later stays open (light on) and sends nowhere.

    Cause: join.js ``deviceCheck()`` (line 145) does not keep the pending
    ``acquireMedia()``; "devices-next" (line 319) is enabled meanwhile and
    ``join()`` (line 171) hands ``media.stream`` (still null) to the call
    (``setLocalStream``, line 182); the stream that arrives later replaces
    ``media`` but never reaches the call."""
    therapist, patient = await phone_at_the_link(live_harness, chromium, SLOW_CAMERA)
    await patient.tap("#intro-next")
    await expect(patient.locator("#device-check")).to_be_visible()
    await agrees_and_joins(patient)
    await expect(patient.locator("#waiting")).to_be_visible()
    await therapist.click("#admit")
    await expect(patient.locator("#call")).to_be_visible()
    await wait_for_remote_video(patient)
    # Long past the camera's start (3 s).
    await patient.wait_for_function(
        "() => window.videoconsult.call.pc"
        " && window.videoconsult.call.pc.connectionState === 'connected'",
        timeout=MEDIA_TIMEOUT_MS,
    )
    await patient.wait_for_timeout(4000)
    sent: dict[str, Any] = await patient.evaluate(MEDIA_STATE)
    told = await therapist.locator("#peer-media").text_content()
    assert sent == {"camera": "on", "microphone": "on"}, (
        f"the patient joined with camera and microphone {sent} although both started; "
        f"the therapist is told: {told!r}"
    )


async def test_consent_asked_again_by_the_server_joins_with_camera_and_microphone(
    chromium: Browser, live_harness: Harness
) -> None:
    """From the last read of the change, not the review: when the server
    answers the ticket request with ``consent_required`` (the page's own
    check passed), the page ends that attempt, which lets the camera and
    microphone go, and asks for consent again; joining then went on with
    no camera and no microphone at all."""
    therapist, patient = await phone_at_the_link(live_harness, chromium, "")
    refused: list[str] = []

    async def refuse_once(route: Route) -> None:
        if refused:
            await route.continue_()
            return
        refused.append(route.request.url)
        await route.fulfill(
            status=422,
            content_type="application/json",
            body='{"error": {"code": "consent_required", "message": "agree first"}}',
        )

    await patient.route("**/ticket", refuse_once)
    await patient.tap("#intro-next")
    await patient.wait_for_function(
        "() => document.getElementById('preview').videoWidth > 0", timeout=MEDIA_TIMEOUT_MS
    )
    await agrees_and_joins(patient)
    await expect(patient.locator("#consent-error")).not_to_be_empty()
    assert refused, "the ticket request was not refused"
    # The box is still ticked: the patient joins again at once.
    await patient.tap("#join-button")
    await expect(therapist.locator("#waiting-notice")).to_be_visible()
    await therapist.click("#admit")
    await wait_for_remote_video(therapist)
    sent: dict[str, Any] = await patient.evaluate(MEDIA_STATE)
    assert sent == {"camera": "on", "microphone": "on"}, (
        f"after consent was asked again the patient joined with {sent}"
    )


@pytest.mark.parametrize(
    "screen",
    [SIDEWAYS_PHONE, SHORT_PHONE],
    ids=["held-sideways-740x360", "upright-360x640"],
)
async def test_on_a_phone_the_call_buttons_are_on_the_screen(
    chromium: Browser, live_harness: Harness, screen: ViewportSize
) -> None:
    """In the call a patient needs Mute, Camera off and Leave at hand. On a
    phone held sideways (740 x 360, the natural way to watch a video call)
    and on a common upright phone whose browser leaves 360 x 640 for the page
    (a 360 x 740 screen less Chrome's address bar), they lie partly or wholly
    below the bottom edge of the screen: the patient sees a sliver of them,
    or nothing, and has to find out that the call page scrolls.

    Cause: style.css. The phone layout ("Phones: the call fills the screen,
    controls stay reachable by thumb", lines 171-172) applies only to
    ``max-width: 600px``, so sideways the desktop stage (16/10, up to 72vh,
    line 127) is used; upright the phone stage takes up to 68vh (line 175)
    under a header, a margin and a two-row control bar whose height it does
    not leave room for."""
    _therapist, patient = await phone_in_a_call(live_harness, chromium, viewport=screen)
    boxes = await patient.evaluate(
        """() => ["mute", "camera", "leave"].map((id) => {
          const box = document.getElementById(id).getBoundingClientRect();
          return [id, Math.round(box.top), Math.round(box.bottom)];
        })"""
    )
    height = screen["height"]
    off_screen = [(name, top, bottom) for name, top, bottom in boxes if bottom > height]
    assert not off_screen, (
        f"on a {screen['width']}x{height} screen these call buttons reach below "
        f"its bottom edge (name, top, bottom in px): {off_screen}"
    )


def local_day(days_ahead: int, time: str) -> str:
    """A datetime-local value ``days_ahead`` of the browser's today, at ``time``."""
    day = (datetime.now(ZONE) + timedelta(days=days_ahead)).date()
    return f"{day.isoformat()}T{time}"


async def test_a_british_patient_who_comes_early_is_told_the_time_on_a_24_hour_clock(
    chromium: Browser, live_harness: Harness
) -> None:
    """A patient whose phone speaks British English (en-GB) comes early and is
    told "The waiting room opens on Wednesday, December 9 at 09:45 AM": the
    American order and 12-hour clock, where every other page, the patient's own receipt
    included, follows the browser's locale (en-GB: a 24-hour clock,
    docs/browser-app.md, Therapist).

    Cause: join.js ``showOpening()`` (lines 105-108) formats with
    ``document.documentElement.lang`` ("en"), not with ``locale()`` from
    i18n.js (line 114) as receipt.js, the dashboard and the support page do."""
    _anna, _therapist_context, therapist = await therapist_logs_in(live_harness, chromium)
    await therapist.fill("#scheduled-at", local_day(2, "10:00"))
    _consult_id, invite_url = await create_consult(therapist)
    patient_context = await phone_context(chromium, live_harness, locale="en-GB")
    patient = await patient_context.new_page()
    await patient.goto(invite_url)
    text = patient.locator("#too-early-text")
    await expect(text).to_contain_text("The waiting room opens on")
    shown = await text.text_content() or ""
    assert "at 09:45." in shown, f"an en-GB phone is told: {shown!r}"


# Every camera and microphone track the page was given, to see afterwards
# which are still open; each getUserMedia answers 2 s late (a phone's camera
# starting, or a permission prompt answered after a moment).
TRACKED_SLOW_CAMERA = """
if (navigator.mediaDevices) {
  window.reviewTracks = [];
  const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = (constraints) =>
    new Promise((done) => setTimeout(done, 2000))
      .then(() => real(constraints))
      .then((stream) => { window.reviewTracks.push(...stream.getTracks()); return stream; });
}
"""
TRACKS = "() => window.reviewTracks.map((track) => `${track.kind}: ${track.readyState}`)"


async def test_try_again_while_the_camera_starts_leaves_no_camera_open_after_the_end(
    chromium: Browser, live_harness: Harness
) -> None:
    """The device check shows a black preview for a moment while the phone's
    camera starts; an anxious patient taps "Try again". Both requests are
    answered, the page keeps the second stream and never stops the first:
    after the consult has ended and the page says "You can close this page
    now", a camera and a microphone are still open (the phone's camera and
    microphone indicators stay on), though nothing is sent anywhere.

    Cause: join.js ``acquireMedia()`` (lines 127-139) stops ``media.stream``
    before it awaits ``getMedia()``, not the stream an earlier call still
    waits for; two calls at once both assign ``media`` (line 130), and the
    first stream (and its level meter's AudioContext, line 133) is lost
    without being stopped. ``finish()`` (line 293) stops only the last."""
    therapist, patient = await phone_at_the_link(live_harness, chromium, TRACKED_SLOW_CAMERA)
    await patient.tap("#intro-next")
    await expect(patient.locator("#device-check")).to_be_visible()
    await patient.tap("#devices-retry")
    await patient.wait_for_function("() => window.reviewTracks.length >= 4")
    await patient.wait_for_function("() => document.getElementById('preview').videoWidth > 0")
    await agrees_and_joins(patient)
    await expect(therapist.locator("#waiting-notice")).to_be_visible()
    await therapist.click("#admit")
    await wait_for_remote_video(patient)
    await wait_for_remote_video(therapist)
    await therapist.click("#end")
    await expect(patient.locator("#ended")).to_be_visible()
    tracks: list[str] = await patient.evaluate(TRACKS)
    still_open = [track for track in tracks if track.endswith("live")]
    assert not still_open, (
        f"after the consult ended the patient's page still holds open: {still_open} "
        f"(all tracks it was given: {tracks})"
    )


async def test_a_ticket_request_that_hangs_does_not_leave_the_patient_in_a_silent_waiting_room(
    chromium: Browser, live_harness: Harness
) -> None:
    """On a phone with a bad signal a request can hang rather than fail. The
    patient taps "Join the waiting room"; the page at once says "You are in
    the waiting room. Your therapist will let you in soon. Keep this page
    open." with its spinner, while the ticket request (and so the socket)
    never gets through: the therapist's page shows no one waiting, and the
    patient's page says nothing about it, for as long as the request hangs.
    Here: 2.5 heartbeats, the silence after which the page itself counts a
    socket as dead (docs/browser-app.md, Reconnecting).

    Cause: join.js ``join()`` (line 176) shows the waiting room before any
    connection; ``ticketUrl()`` (line 153) fetches without a time limit, and
    call.js ``connect()`` (line 97) awaits it with no timer: no
    "reconnecting" event, no retry. The heartbeat (call.js line 152) starts
    only after a first ``welcome`` and looks only at an open socket."""
    harness = live_harness
    _anna, _therapist_context, therapist = await therapist_logs_in(harness, chromium)
    consult_id, invite_url = await create_consult(therapist)
    await open_consult(therapist, consult_id)
    patient_context = await phone_context(chromium, harness)
    patient = await patient_context.new_page()
    await patient.goto(invite_url)
    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)  # never answered

    await patient.route("**/ticket", hold)
    await patient.tap("#intro-next")
    await patient.wait_for_function("() => document.getElementById('preview').videoWidth > 0")
    await agrees_and_joins(patient)
    await expect(patient.locator("#waiting")).to_be_visible()
    dead_after_s = 2.5 * harness.app[SETTINGS].signaling.heartbeat_s
    await patient.wait_for_timeout((dead_after_s + 5) * 1000)
    assert held, "the ticket request was not made"
    assert not await therapist.locator("#waiting-notice").is_visible()
    status = (await patient.locator("#waiting-status").text_content() or "").strip()
    presence = (await patient.locator("#waiting-therapist").text_content() or "").strip()
    assert status or presence, (
        f"after {dead_after_s + 5:.0f} s of a hanging ticket request the patient's page still "
        f"shows only: {await patient.locator('#waiting').inner_text()!r}; the server never "
        "heard of the patient"
    )
