"""The browser app's files: every string translated, no inline script or
style, nothing loaded from elsewhere; and the pages are served."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from audit.access_log import Break
from audit.consults import ConsultStatus, InviteProblem
from audit.roles import Role
from server.pages import STATIC_DIR
from signaling.protocol import EndReason
from tests.support.harness import Harness

I18N = STATIC_DIR / "js" / "i18n.js"
MESSAGE_MODULES = [I18N, *sorted((STATIC_DIR / "js").glob("i18n_*.js"))]
HTML = sorted(STATIC_DIR.glob("*.html"))
SCRIPTS = sorted((STATIC_DIR / "js").glob("*.js"))
# Families of keys the scripts build at run time (t(`invite.${code}`) etc.).
DYNAMIC_KEYS = (
    [f"invite.invite_{problem.value}" for problem in InviteProblem]
    + [f"status.{status.value}" for status in ConsultStatus]
    + [
        f"ended.{reason}"
        for reason in (
            "ended_by_therapist",
            "both_left",
            "max_duration",
            "not_joined",
            "consult_over",
        )
    ]
    + [
        f"devices.{kind}.{problem}"
        for kind in ("camera", "microphone")
        for problem in ("blocked", "missing", "busy")
    ]
    + [f"quality.{level}" for level in ("unknown", "good", "fair", "poor")]
    + [f"support.ended.{reason.value}" for reason in EndReason]
    + [f"login.reason.{reason}" for reason in ("idle", "session", "logout", "login")]
    + [f"consent.{code}" for code in ("consent_required", "guardian_consent_required")]
    + [f"role.{role.value}" for role in Role]
    + [f"admin.status.{status}" for status in ("active", "enrolling", "disabled")]
    + [f"admin.outcome.{outcome}" for outcome in ("allowed", "refused")]
    + [f"admin.verify.kind.{kind.value}" for kind in Break]
    + [
        f"admin.actor.{role}"
        for role in ("operator", "system", "link_holder", "therapist", "support", "admin")
    ]
    + [
        f"apiError.{code}"
        for code in (
            "conflict",
            "not_found",
            "forbidden",
            "invalid_field",
            "too_many_requests",
            "internal_error",
        )
    ]
    + [
        f"call.{key}.{role}"
        for key in ("peerReconnecting", "peerLeft", "remoteLabel")
        for role in ("therapist", "patient")
    ]
)


def messages() -> dict[str, set[str]]:
    """The keys of each language in i18n.js and the modules that add to it (i18n_*.js)."""
    found: dict[str, set[str]] = {}
    for module in MESSAGE_MODULES:
        blocks = re.split(r"^  (en|nl): \{$", module.read_text(), flags=re.MULTILINE)
        for language, block in zip(blocks[1::2], blocks[2::2], strict=True):
            body = block.split("\n  },", 1)[0]
            keys = set(re.findall(r'^\s+"([\w.]+)": ', body, flags=re.MULTILINE))
            found.setdefault(language, set()).update(keys)
    return found


def used_keys() -> set[str]:
    keys: set[str] = set()
    for page in HTML:
        keys |= set(re.findall(r'data-i18n(?:-aria|-alt)?="([\w.]+)"', page.read_text()))
    for script in SCRIPTS:
        if script in MESSAGE_MODULES:
            continue
        # Every string literal shaped like a key ("app.call.admit"), wherever it
        # is passed (t(), button(), arrays), but not storage keys.
        for literal in re.findall(r'"([a-z][a-zA-Z]*(?:\.[a-zA-Z_]+)+)"', script.read_text()):
            if not literal.startswith("videoconsult."):
                keys.add(literal)
    return keys


# The bound tests/test_layout.py sets for a Python module holds for a script too.
MOST_SCRIPT_LINES = 600


def test_no_script_is_longer_than_its_concept_needs() -> None:
    too_long = {
        script.name: lines
        for script in SCRIPTS
        if (lines := len(script.read_text().splitlines())) > MOST_SCRIPT_LINES
    }
    assert not too_long, f"over {MOST_SCRIPT_LINES} lines: {too_long}"


def test_both_languages_have_the_same_keys() -> None:
    found = messages()
    assert set(found) == {"en", "nl"}
    assert len(found["en"]) > 100
    assert found["en"] - found["nl"] == set(), "missing in Dutch"
    assert found["nl"] - found["en"] == set(), "missing in English"


def test_every_string_the_pages_use_is_translated() -> None:
    known = messages()["en"]
    used = used_keys() | set(DYNAMIC_KEYS)
    assert len(used) > 100
    assert used - known == set()


@pytest.mark.parametrize("path", HTML + SCRIPTS + [STATIC_DIR / "style.css"], ids=lambda p: p.name)
def test_no_inline_code_and_nothing_from_elsewhere(path: Path) -> None:
    text = path.read_text()
    if path.suffix == ".html":
        for tag in re.findall(r"<script\b[^>]*>", text):
            assert "src=" in tag, f"inline script in {path.name}: {tag}"
        assert not re.search(r"\sstyle=", text), f"inline style in {path.name}"
        assert not re.search(r"\son[a-z]+=", text), f"inline event handler in {path.name}"
        assert "<style" not in text
    # Every asset from our own server: no CDN, no fonts or scripts elsewhere.
    assert not re.search(r"(src|href)=\"(https?:)?//", text), path.name
    assert not re.search(r"url\((['\"]?)(https?:)?//", text), path.name
    assert not re.search(r"import .* from \"(https?:)?//", text), path.name


@pytest.mark.parametrize("path", ["/", "/login", "/app", "/support", "/admin", "/join/" + "A" * 43])
async def test_the_pages_are_served_with_the_strict_policy(
    sqlite_harness: Harness, path: str
) -> None:
    response = await sqlite_harness.client.get(path)
    assert response.status == 200
    assert response.content_type == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert '<script type="module" src="/static/js/' in await response.text()


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize("path", ["/no-such-page", "/join/", "/join", "/app/x"])
async def test_a_browser_asking_for_an_unknown_page_gets_an_html_page(
    sqlite_harness: Harness, path: str
) -> None:
    response = await sqlite_harness.client.get(path, headers={"Accept": BROWSER_ACCEPT})
    assert response.status == 404
    assert response.content_type == "text/html"
    text = await response.text()
    assert "<h1" in text
    assert 'href="/"' in text
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]


@pytest.mark.parametrize("accept", ["application/json", "*/*", ""])
async def test_an_api_client_asking_for_an_unknown_path_still_gets_json(
    sqlite_harness: Harness, accept: str
) -> None:
    for path in ("/no-such-page", "/api/nothing-here"):
        response = await sqlite_harness.client.get(path, headers={"Accept": accept})
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
    # An API path answers JSON even to a browser.
    api = await sqlite_harness.client.get("/api/nothing", headers={"Accept": BROWSER_ACCEPT})
    assert api.content_type == "application/json"


@pytest.mark.parametrize(
    ("role", "home"),
    [(Role.ADMIN, "/admin"), (Role.THERAPIST, "/app"), (Role.SUPPORT, "/support")],
)
async def test_a_logged_in_visit_to_the_login_page_goes_on_to_the_roles_own_page(
    sqlite_harness: Harness, role: Role, home: str
) -> None:
    """As login.js sends each role after logging in (js/roles.js); found at
    merge: the server sent an admin to the therapist's page."""
    person = await sqlite_harness.professional(f"{role.value}@praktijk-noord.example", role)
    await sqlite_harness.logged_in(person)
    answer = await sqlite_harness.client.get(
        "/login", headers=sqlite_harness.headers, allow_redirects=False
    )
    assert (answer.status, answer.headers["Location"]) == (302, home)
