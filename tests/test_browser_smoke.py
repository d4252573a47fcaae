"""Smoke tests for the browser infrastructure: real Chromium against the real server."""

from __future__ import annotations

import asyncio
from html.parser import HTMLParser
from typing import Any

import pytest
from playwright.async_api import Browser

from audit.accounts import Role
from server.pages import STATIC_DIR
from server.web_security import CONTENT_SECURITY_POLICY
from tests.support.axe import assert_accessible
from tests.support.browser import (
    ScreenshotSaver,
    assert_no_browser_errors,
    browser_problems,
    new_context,
)
from tests.support.harness import Harness

pytestmark = pytest.mark.browser

GET_USER_MEDIA = """async () => {
  const stream = await navigator.mediaDevices.getUserMedia({video: true, audio: true});
  const tracks = stream.getTracks().map((t) => ({kind: t.kind, state: t.readyState}));
  stream.getTracks().forEach((t) => t.stop());
  return {secure: window.isSecureContext, tracks};
}"""

FETCH_JSON = """async ([method, path, body]) => {
  const init = {method, headers: {"Content-Type": "application/json"}};
  if (body !== null) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  const text = await response.text();
  return {status: response.status, body: text ? JSON.parse(text) : null};
}"""


class _TitleAndHeading(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[str, str] = {}
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in {"title", "h1"} and tag not in self.texts:
            self._open = tag
            self.texts[tag] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open:
            self.texts[self._open] += data


def start_page_texts() -> tuple[str, str]:
    """The <title> and the first <h1> as server/static/index.html has them."""
    parser = _TitleAndHeading()
    parser.feed((STATIC_DIR / "index.html").read_text())
    return parser.texts["title"].strip(), parser.texts["h1"].strip()


async def test_start_page_loads_cleanly_and_the_fake_camera_works(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    title, heading = start_page_texts()
    # An English-speaking browser sees the page as written; a Dutch one in Dutch.
    context = await new_context(chromium, live_harness.origin, locale="en-GB")
    page = await context.new_page()

    response = await page.goto("/")
    assert response is not None
    assert response.status == 200
    assert response.url == live_harness.origin + "/"
    assert (await response.all_headers())["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert await page.title() == title
    assert (await page.locator("h1").inner_text()).strip() == heading

    media = await page.evaluate(GET_USER_MEDIA)
    assert media["secure"] is True
    assert sorted(track["kind"] for track in media["tracks"]) == ["audio", "video"]
    assert all(track["state"] == "live" for track in media["tracks"]), media

    path = await screenshot(page, "start-page")
    assert path.stat().st_size > 0
    await assert_accessible(page, "start page")
    dutch = await new_context(chromium, live_harness.origin, locale="nl-NL")
    dutch_page = await dutch.new_page()
    await dutch_page.goto("/")
    assert (await dutch_page.locator("h1").inner_text()).strip() == "Videoconsulten"
    await assert_accessible(dutch_page, "start page, Dutch")
    assert await dutch_page.evaluate("document.documentElement.lang") == "nl"
    await assert_no_browser_errors(context, dutch)


async def test_browser_requests_pass_the_origin_check_and_keep_the_session(
    chromium: Browser, live_harness: Harness
) -> None:
    anna = await live_harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    context = await new_context(chromium, live_harness.origin)
    page = await context.new_page()
    await page.goto("/")

    credentials = {
        "email": anna.email,
        "password": anna.password,
        "code": live_harness.code(anna.secret),
    }
    login = await page.evaluate(FETCH_JSON, ["POST", "/api/login", credentials])
    assert login["status"] == 200, login
    session = await page.evaluate(FETCH_JSON, ["GET", "/api/session", None])
    assert session["status"] == 200, session
    logout = await page.evaluate(FETCH_JSON, ["POST", "/api/logout", None])
    assert logout["status"] == 204, logout
    ended = await page.evaluate(FETCH_JSON, ["GET", "/api/session", None])
    assert ended["status"] == 401, ended
    # Chromium logs the planned 401 as a console error; nothing else may appear.
    await assert_no_browser_errors(context, allow=[r"status of 401 .*/api/session\b"])


async def test_csp_violations_and_page_errors_are_caught(
    chromium: Browser, live_harness: Harness
) -> None:
    """The error collection itself: without it the clean-page test proves nothing."""
    context = await new_context(chromium, live_harness.origin)
    page = await context.new_page()
    await page.goto("/")
    assert browser_problems(context) == []

    # What an inline script would do under our CSP: refused, and reported.
    ran = await page.evaluate(
        """() => {
          const script = document.createElement("script");
          script.textContent = "window.inlineRan = true";
          document.head.append(script);
          setTimeout(() => { throw new Error("boom from a timer"); }, 0);
          return window.inlineRan === true;
        }"""
    )
    assert ran is False
    for _ in range(50):
        kinds = {problem.kind for problem in browser_problems(context)}
        if {"csp", "pageerror"} <= kinds:
            break
        await asyncio.sleep(0.05)
    problems = browser_problems(context)
    assert any(p.kind == "csp" and "script-src" in p.text for p in problems), problems
    assert any(p.kind == "pageerror" and "boom from a timer" in p.text for p in problems), problems
    with pytest.raises(AssertionError, match="boom from a timer"):
        await assert_no_browser_errors(context)


async def test_the_accessibility_check_fails_on_a_serious_violation(
    chromium: Browser, live_harness: Harness
) -> None:
    """The axe-core check itself: without it the pages' clean results prove nothing."""
    context = await new_context(chromium, live_harness.origin)
    page = await context.new_page()
    await page.goto("/")
    await assert_accessible(page)
    # An image without a text alternative: axe-core's "image-alt", critical.
    await page.evaluate(
        """() => {
          const image = document.createElement("img");
          image.src = "/static/icon.svg";
          document.querySelector("main").append(image);
        }"""
    )
    with pytest.raises(AssertionError, match="image-alt"):
        await assert_accessible(page, "with an unlabelled image")
    await context.close()
