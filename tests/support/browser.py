"""End-to-end browser helpers: Playwright driving Debian's Chromium.

Chromium comes from the system (Debian package ``chromium``), never from
``playwright install``: this machine cannot download browsers. The fixtures
that use these helpers live in ``conftest.py`` (``chromium``,
``live_harness``, ``screenshot``).

Every context made by :func:`new_context` records the browser's console
errors, uncaught page errors and Content-Security-Policy violations;
:func:`assert_no_browser_errors` fails a test on any of them.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    ViewportSize,
    expect,
)
from playwright.async_api import Error as PlaywrightError

from audit.roles import Role
from tests.support import ROOT
from tests.support.axe import assert_accessible
from tests.support.harness import Harness, Professional

DEFAULT_CHROMIUM = "/usr/bin/chromium"
DEFAULT_SCREENSHOTS = ROOT / "test-output" / "screenshots"

# Fake camera and microphone, no permission prompt; and nothing that talks to
# the outside world (the closed network refuses those connections noisily).
CHROMIUM_ARGS = (
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
LAUNCH_TIMEOUT_MS = 20_000
# How long an expect() waits for the page to get there (Playwright's default
# is 5 s). The browser tests run two at a time next to each other's Chromium
# and servers; on a busy machine a page took longer than 5 s to load, and
# the test failed though the page came right. How fast a page is, where that
# is the point, is measured with a timer of its own, not by this.
EXPECT_TIMEOUT_MS = 15_000
expect.set_options(timeout=EXPECT_TIMEOUT_MS)
DEFAULT_VIEWPORT: ViewportSize = {"width": 1280, "height": 800}

# Called by the init script below for every securitypolicyviolation event.
_CSP_BINDING = "__videoconsultTestCspViolation"
_CSP_LISTENER = f"""
document.addEventListener("securitypolicyviolation", (event) => {{
  window.{_CSP_BINDING}({{
    directive: event.effectiveDirective,
    blocked: event.blockedURI,
    source: event.sourceFile,
    line: event.lineNumber,
    sample: event.sample,
  }});
}}, true);
"""

ScreenshotSaver = Callable[[Page, str], Awaitable[Path]]


class BrowserUnavailable(Exception):
    """Chromium is missing or would not start; the message says why."""


def chromium_executable() -> Path:
    """The Chromium to drive: ``VIDEOCONSULT_TEST_CHROMIUM``, else Debian's."""
    return Path(os.environ.get("VIDEOCONSULT_TEST_CHROMIUM") or DEFAULT_CHROMIUM)


# A real Chromium with a fake microphone but no camera at all: its fake
# capture factory then reports no video device (NotFoundError).
WITHOUT_CAMERA = ("--use-fake-device-for-media-stream=device-count=0",)
# Two fake cameras, for switching devices in a call.
TWO_CAMERAS = ("--use-fake-device-for-media-stream=device-count=2",)


def _with_args(extra: Sequence[str]) -> list[str]:
    """The default arguments, each replaced by an extra one of the same flag."""
    flags = {arg.split("=", 1)[0] for arg in extra}
    return [arg for arg in CHROMIUM_ARGS if arg.split("=", 1)[0] not in flags] + list(extra)


async def launch_chromium(
    playwright: Playwright, executable: Path | None = None, *, extra_args: Sequence[str] = ()
) -> Browser:
    """Launch headless Chromium on a fresh temporary profile.

    ``extra_args`` add to (or replace, flag by flag) :data:`CHROMIUM_ARGS`.
    Raises :class:`BrowserUnavailable` when the program is missing or fails
    to start.
    """
    executable = executable or chromium_executable()
    if not executable.is_file():
        raise BrowserUnavailable(f"{executable} does not exist (Debian package: chromium)")
    if not os.access(executable, os.X_OK):
        raise BrowserUnavailable(f"{executable} is not executable")
    try:
        return await playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=_with_args(extra_args),
            timeout=LAUNCH_TIMEOUT_MS,
        )
    except PlaywrightError as err:
        raise BrowserUnavailable(
            f"{executable} failed to launch: {_launch_failure(err.message)}"
        ) from None


def _launch_failure(message: str) -> str:
    """The gist of Playwright's launch error: its first line, and of the long
    call log only the browser's stderr and how the process ended."""
    lines = message.splitlines()
    call_log = lines[lines.index("Call log:") + 1 :] if "Call log:" in lines else lines[1:]
    telling = [
        line.strip(" -")
        for line in call_log
        if "[err]" in line or "process did exit" in line or "Timeout" in line
    ]
    return "; ".join([lines[0] if lines else "?", *telling[-5:]])[:1000]


@dataclass(frozen=True)
class BrowserProblem:
    kind: str  # "console", "pageerror" or "csp"
    page_url: str
    text: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.page_url}: {self.text}"


_problems: weakref.WeakKeyDictionary[BrowserContext, list[BrowserProblem]] = (
    weakref.WeakKeyDictionary()
)


async def new_context(
    browser: Browser,
    origin: str,
    *,
    viewport: ViewportSize | None = None,
    locale: str = "nl-NL",
    timezone_id: str = "Europe/Amsterdam",
) -> BrowserContext:
    """A browser context for one participant (its own cookies and storage).

    Camera and microphone are granted to ``origin``, which is also the base
    URL (``page.goto("/")``). Console errors, page errors and CSP violations
    of every page in the context are recorded; see :func:`browser_problems`.
    """
    context = await browser.new_context(
        base_url=origin,
        viewport=viewport or DEFAULT_VIEWPORT,
        locale=locale,
        timezone_id=timezone_id,
    )
    await context.grant_permissions(["camera", "microphone"], origin=origin)
    problems: list[BrowserProblem] = []
    _problems[context] = problems

    async def csp_violation(source: dict[str, Any], report: dict[str, Any]) -> None:
        page = source.get("page")
        url = page.url if isinstance(page, Page) else "?"
        text = ", ".join(f"{key}={value!r}" for key, value in report.items() if value)
        problems.append(BrowserProblem("csp", url, text))

    await context.expose_binding(_CSP_BINDING, csp_violation)
    await context.add_init_script(_CSP_LISTENER)
    context.on("page", lambda page: _watch(page, problems))
    return context


def _watch(page: Page, problems: list[BrowserProblem]) -> None:
    def console(message: ConsoleMessage) -> None:
        if message.type == "error" and not _browser_noise(message):
            where = message.location
            at = f" ({where['url']}:{where['lineNumber']})" if where.get("url") else ""
            problems.append(BrowserProblem("console", page.url, message.text + at))

    def page_error(error: PlaywrightError) -> None:
        problems.append(BrowserProblem("pageerror", page.url, error.stack or error.message))

    page.on("console", console)
    page.on("pageerror", page_error)


def _browser_noise(message: ConsoleMessage) -> bool:
    """Errors the page did not cause: Chromium asks every origin for
    /favicon.ico by itself and logs the 404 when there is none."""
    return urlsplit(message.location.get("url", "")).path == "/favicon.ico"


def browser_problems(context: BrowserContext) -> list[BrowserProblem]:
    """What went wrong in ``context`` so far (the live list, in order)."""
    return _problems[context]


async def settle(context: BrowserContext) -> None:
    """Let each open page finish its pending work, so that reports of what
    already happened (console messages, CSP events) have reached us."""
    for page in context.pages:
        if page.is_closed():
            continue
        try:
            await page.evaluate("() => new Promise((done) => setTimeout(done, 50))")
        except PlaywrightError:
            continue  # navigating or closing: nothing to wait for


async def assert_no_browser_errors(*contexts: BrowserContext, allow: Iterable[str] = ()) -> None:
    """Fail when any page of these contexts logged an error, threw, or broke the CSP.

    ``allow`` holds regular expressions for problems the test expects, searched
    in each problem's text: Chromium logs every HTTP error response as a console
    error, so ``allow=[r"status of 401 .*/api/session"]`` for a planned 401.
    """
    allowed = [re.compile(pattern) for pattern in allow]
    problems: list[BrowserProblem] = []
    for context in contexts:
        await settle(context)
        problems += [
            problem
            for problem in browser_problems(context)
            if not any(pattern.search(str(problem)) for pattern in allowed)
        ]
    assert not problems, "the browser reported errors:\n" + "\n".join(map(str, problems))


def screenshots_dir() -> Path:
    """Where screenshots go: ``VIDEOCONSULT_TEST_SCREENSHOTS``, else
    ``test-output/screenshots/`` in the repository (ignored by git)."""
    configured = os.environ.get("VIDEOCONSULT_TEST_SCREENSHOTS")
    return Path(configured).resolve() if configured else DEFAULT_SCREENSHOTS


_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")


def directory_for_test(nodeid_name: str) -> str:
    """A file-system-safe directory name for a test (``test_x[sqlite]`` too)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid_name).strip("_") or "test"


async def save_screenshot(page: Page, directory: Path, name: str) -> Path:
    """Save a full-page PNG of ``page`` as ``directory/name.png``; return the path.

    ``name`` says what it shows, in lower case with hyphens:
    ``"patient-waiting-room"``.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"screenshot name {name!r}: use lower case, digits and hyphens")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    await page.screenshot(path=path, full_page=True)
    return path


PHONE: ViewportSize = {"width": 390, "height": 844}


MEDIA_TIMEOUT_MS = 30_000


# Chromium logs every HTTP error response as a console error; these are
# planned: /api/session before login, and the invite check of a dead link.
EXPECTED_HTTP_ERRORS = [
    r"status of 401 .*/api/session",
    r"status of 410 .*/api/invites/",
    r"status of 404 .*/api/invites/",
]


async def therapist_logs_in(
    harness: Harness, browser: Browser, email: str = "anna@praktijk-noord.example"
) -> tuple[Professional, BrowserContext, Page]:
    anna = await harness.professional(email, Role.THERAPIST)
    context = await new_context(browser, harness.origin, locale="en-GB")
    page = await context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    await page.goto("/app")
    await page.wait_for_url("**/login?**")
    await assert_accessible(page, "login page")
    await logs_in(harness, page, anna)
    return anna, context, page


async def submit_login(harness: Harness, page: Page, who: Professional) -> None:
    """Fill in the login page open in ``page`` as ``who`` and send it."""
    await page.fill("#email", who.email)
    await page.fill("#password", who.password)
    await page.fill("#code", harness.code(who.secret))
    await page.click("#login-button")


async def logs_in(harness: Harness, page: Page, who: Professional) -> None:
    """Fill in the login page open in ``page``; wait for the dashboard."""
    await submit_login(harness, page, who)
    await page.wait_for_url("**/app*")
    await expect(page.locator("#dashboard")).to_be_visible()
    await assert_accessible(page, "dashboard")


async def login_page(harness: Harness, browser: Browser) -> tuple[BrowserContext, Page]:
    """A new browser (en-GB) on the login page."""
    context = await new_context(browser, harness.origin, locale="en-GB")
    page = await context.new_page()
    await page.goto("/login")
    return context, page


async def wrong_login(page: Page, who: Professional) -> None:
    """Try to log in as ``who`` with a wrong password; wait for the answer."""
    await page.fill("#email", who.email)
    await page.fill("#password", "not the password")
    await page.fill("#code", "000000")
    await page.click("#login-button")
    await expect(page.locator("#login-button")).to_be_enabled()


async def create_consult(page: Page, *, name: str = "", minor: bool = False) -> tuple[str, str]:
    """Create a consult in the dashboard; return its id and invite link."""
    if name:
        await page.fill("#display-name", name)
    if minor:
        await page.check("#minor")
    # The id and link come from the server's answer: the page shows the invite
    # box before it loads the list again, and a box from an earlier consult
    # may already be showing (tests/test_browser_helpers.py).
    async with page.expect_response(
        lambda r: r.request.method == "POST" and urlsplit(r.url).path == "/api/consults"
    ) as made:
        await page.click("#new-button")
    response = await made.value
    assert response.ok, f"creating the consult: {response.status} {await response.text()}"
    answer = await response.json()
    consult_id, url = answer["consult"]["id"], answer["invite_url"]
    await expect(page.locator("#invite-url")).to_have_value(url)
    await expect(page.locator(f'table.consults tr[data-consult="{consult_id}"]')).to_have_count(1)
    await assert_accessible(page, "dashboard with a new invite link")
    return consult_id, url


async def patient_opens(
    browser: Browser, harness: Harness, url: str, *, viewport: ViewportSize | None = None
) -> tuple[BrowserContext, Page]:
    context = await new_context(browser, harness.origin, locale="en-GB", viewport=viewport)
    page = await context.new_page()
    await page.goto(url)
    return context, page


async def patient_joins(
    page: Page, screenshot: ScreenshotSaver | None = None, *, guardian: bool = False
) -> None:
    await expect(page.locator("#intro")).to_be_visible()
    await assert_accessible(page, "patient intro")
    if screenshot:
        await screenshot(page, "patient-intro")
    await page.click("#intro-next")
    await expect(page.locator("#device-check")).to_be_visible()
    await page.wait_for_function(
        "() => document.getElementById('preview').videoWidth > 0", timeout=MEDIA_TIMEOUT_MS
    )
    await assert_accessible(page, "patient device check")
    if screenshot:
        await screenshot(page, "patient-device-check")
    await page.click("#devices-next")
    await expect(page.locator("#consent")).to_be_visible()
    await page.check("#consent-box")
    if guardian:
        await page.check("#guardian-box")
    await assert_accessible(page, "patient consent")
    if screenshot:
        await screenshot(page, "patient-consent")
    await page.click("#join-button")
    await expect(page.locator("#waiting")).to_be_visible()
    await assert_accessible(page, "patient waiting room")


async def open_consult(page: Page, consult_id: str) -> None:
    await page.locator(f'tr[data-consult="{consult_id}"] button', has_text="Open").click()
    await expect(page.locator("#call-view")).to_be_visible()
    await assert_accessible(page, "call view")


async def wait_for_remote_video(page: Page) -> None:
    await page.wait_for_function(
        "() => document.getElementById('remote-video').videoWidth > 0", timeout=MEDIA_TIMEOUT_MS
    )


async def bytes_received(page: Page) -> int:
    stats: dict[str, Any] = await page.evaluate("() => window.videoconsult.call.stats")
    return int(stats["bytesReceived"])


async def inbound_media_grows(page: Page) -> None:
    """The inbound RTP byte count of the page's call grows (stats every 2 s)."""
    await page.wait_for_function(
        "() => window.videoconsult && window.videoconsult.call.stats.bytesReceived > 0",
        timeout=MEDIA_TIMEOUT_MS,
    )
    before = await bytes_received(page)
    await page.wait_for_function(
        f"() => window.videoconsult.call.stats.bytesReceived > {before}",
        timeout=MEDIA_TIMEOUT_MS,
    )


UNLABELLED_CONTROLS = """() => Array.from(
  document.querySelectorAll("button, input, select, video, meter, a[href]")
).filter((el) => el.getClientRects().length > 0)
 .filter((el) => !(
   (el.labels && el.labels.length) || el.getAttribute("aria-label") || el.textContent.trim()
 ))
 .map((el) => el.id || el.outerHTML.slice(0, 60))"""


async def assert_controls_labelled(page: Page) -> None:
    """Every visible control has a name a screen reader can say."""
    assert await page.evaluate(UNLABELLED_CONTROLS) == []
