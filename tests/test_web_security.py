"""Web hygiene: CSRF protection by strict Origin check, security headers everywhere."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from audit.accounts import Role
from server import create_app
from server.web_security import CONTENT_SECURITY_POLICY
from tests.support.harness import Harness
from tests.support.settings import SettingsFactory


async def test_state_changing_request_from_our_own_origin_is_accepted(
    sqlite_harness: Harness,
) -> None:
    anna = await sqlite_harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    response = await sqlite_harness.login(anna)  # carries Origin: our own
    assert response.status == 200


@pytest.mark.parametrize(
    ("origin", "code"),
    [
        (None, "origin_required"),
        ("https://evil.example", "origin_refused"),
        ("null", "origin_refused"),
        ("http://127.0.0.1:1", "origin_refused"),
    ],
)
async def test_state_changing_request_from_elsewhere_is_refused(
    sqlite_harness: Harness, origin: str | None, code: str
) -> None:
    anna = await sqlite_harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await sqlite_harness.logged_in(anna)
    headers = {} if origin is None else {"Origin": origin}
    logout = await sqlite_harness.client.post("/api/logout", headers=headers)
    assert logout.status == 403
    assert (await logout.json())["error"]["code"] == code
    # The session survived the forged request.
    assert (await sqlite_harness.client.get("/api/session")).status == 200


async def test_patch_from_another_site_is_refused_before_anything_changes(
    sqlite_harness: Harness,
) -> None:
    admin = await sqlite_harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    anna = await sqlite_harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await sqlite_harness.logged_in(admin)
    response = await sqlite_harness.client.patch(
        f"/api/admin/accounts/{anna.account_id}",
        json={"role": "admin"},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status == 403
    listing = await (await sqlite_harness.client.get("/api/admin/accounts")).json()
    assert {a["email"]: a["role"] for a in listing["accounts"]}[anna.email] == "therapist"


async def test_reads_need_no_origin(sqlite_harness: Harness) -> None:
    assert (await sqlite_harness.client.get("/api/session")).status == 401


def assert_security_headers(headers: Any) -> None:
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in headers["Content-Security-Policy"]
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert "camera=(self)" in headers["Permissions-Policy"]
    assert "microphone=(self)" in headers["Permissions-Policy"]
    assert headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),
        ("GET", "/healthz", 200),
        ("GET", "/api/session", 401),
        ("GET", "/no/such/page", 404),
        ("POST", "/api/login", 403),
        ("GET", "/api/enrolment/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", 404),
        ("PUT", "/api/login", 403),
        ("GET", "/api/login", 405),
        ("HEAD", "/", 200),
    ],
)
async def test_every_response_carries_the_security_headers(
    sqlite_harness: Harness, method: str, path: str, status: int
) -> None:
    response = await sqlite_harness.client.request(method, path)
    assert response.status == status
    assert_security_headers(response.headers)
    assert "Strict-Transport-Security" not in response.headers  # plain HTTP here
    if path.startswith("/api/"):
        assert response.headers["Cache-Control"] == "no-store"


async def test_behind_tls_hsts_is_sent_and_the_cookie_is_secure(
    make_settings: SettingsFactory, clock: Any, aiohttp_client: Any
) -> None:
    public = "https://video.praktijk-noord.example"
    app = create_app(make_settings(server_public_url=public), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    harness.origin = public
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    response = await harness.login(anna)
    assert response.status == 200
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    assert_security_headers(response.headers)
    cookie = response.cookies["__Host-vc_session"]
    assert cookie["secure"]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    # Behind TLS the configured origin is the only one accepted.
    harness.origin = str(harness.client.make_url("/")).rstrip("/")
    refused = await harness.login(anna)
    assert refused.status == 403


async def test_request_bodies_over_the_limit_are_refused_before_parsing(
    sqlite_harness: Harness,
) -> None:
    response = await sqlite_harness.post(
        "/api/login",
        data=b"x" * (70 * 1024),
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 413
    assert_security_headers(response.headers)


async def test_enrolment_link_opens_a_page_that_loads_only_our_own_script(
    sqlite_harness: Harness,
) -> None:
    import re

    token = await sqlite_harness.invite("anna@praktijk-noord.example", Role.THERAPIST)
    page = await sqlite_harness.client.get(f"/enrol/{token}")
    assert page.status == 200
    html = await page.text()
    assert_security_headers(page.headers)
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts, "the page has a script"
    for attributes, body in scripts:
        assert body.strip() == "", "no inline script (the CSP forbids it)"
        assert 'src="/static/' in attributes
    assert "http://" not in html
    assert "https://" not in html
    for asset in ("/static/js/enrol.js", "/static/style.css"):
        response = await sqlite_harness.client.get(asset)
        assert response.status == 200
        assert_security_headers(response.headers)
    script = await (await sqlite_harness.client.get("/static/js/enrol.js")).text()
    assert "/api/enrolment/" in script


async def raw_get(harness: Harness, path: str, header_lines: list[bytes]) -> int:
    """Send a GET with header bytes no HTTP library would build; return the status."""
    server = harness.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        request = b"\r\n".join(
            [
                f"GET {path} HTTP/1.1".encode(),
                f"Host: {server.host}:{server.port}".encode(),
                *header_lines,
                b"Connection: close",
                b"",
                b"",
            ]
        )
        writer.write(request)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=5)
        return int(status_line.split()[1])
    finally:
        writer.close()


# Bytes that are not UTF-8 (the finding: a UnicodeEncodeError and 500), a
# lone surrogate's UTF-8 bytes, controls, and what survives none of those.
BAD_COOKIE_VALUES = [b"\xff\xfe\xfd", b"abc\xc3", b"\xed\xb2\x80xyz", b"\x01\x7f", b"caf\xc3\xa9"]


@pytest.mark.parametrize("value", BAD_COOKIE_VALUES)
@pytest.mark.parametrize("path", ["/api/session", "/api/consults", "/ws?consult=x"])
async def test_a_session_cookie_of_any_bytes_is_refused_never_an_error(
    sqlite_harness: Harness, path: str, value: bytes
) -> None:
    origin = sqlite_harness.headers["Origin"].encode()
    status = await raw_get(
        sqlite_harness, path, [b"Cookie: vc_session=" + value, b"Origin: " + origin]
    )
    assert status in (400, 401), status


@pytest.mark.parametrize(
    "header",
    [b"User-Agent: \xff\xfe", b"Origin: http://\xff.example", b"X-Forwarded-For: \xc3("],
)
async def test_other_headers_of_any_bytes_never_give_an_error(
    sqlite_harness: Harness, header: bytes
) -> None:
    for path in ("/api/session", "/ws?consult=x", "/healthz", "/"):
        status = await raw_get(sqlite_harness, path, [header])
        assert status < 500, (path, status)


@pytest.mark.parametrize("query", ["ticket=%FF%FE", "ticket=%ED%B2%80" + "a" * 40, "consult=%FF"])
async def test_a_socket_query_of_any_bytes_is_refused_never_an_error(
    sqlite_harness: Harness, query: str
) -> None:
    origin = sqlite_harness.headers["Origin"].encode()
    status = await raw_get(sqlite_harness, f"/ws?{query}", [b"Origin: " + origin])
    assert status in (400, 401, 404), status


# In development without server.public_url, our origin is taken from the
# request: only a loopback host (what a developer's browser uses) is believed.
# Another Host (DNS rebinding, or a forged header) must neither pass the
# Origin check nor become the host of an invite link.
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "10.0.0.7:8000"])
async def test_without_a_public_url_a_foreign_host_builds_no_link(
    sqlite_harness: Harness, host: str
) -> None:
    anna = await sqlite_harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await sqlite_harness.logged_in(anna)
    forged = {"Host": host, "Origin": f"http://{host}"}
    response = await sqlite_harness.client.post("/api/consults", json={}, headers=forged)
    assert response.status == 403
    body = await response.json()
    assert body["error"]["code"] == "host_unknown"
    assert "server.public_url" in body["error"]["message"]
    listing = await (await sqlite_harness.client.get("/api/consults")).json()
    assert listing["consults"] == []  # nothing was created
    for headers in (forged, {"Host": host}):  # with and without an Origin
        socket = await sqlite_harness.client.get("/ws?consult=x", headers=headers)
        assert socket.status == 403
        assert (await socket.json())["error"]["code"] == "host_unknown"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "127.0.0.2"])
async def test_without_a_public_url_a_loopback_host_builds_the_link(
    sqlite_harness: Harness, host: str
) -> None:
    anna = await sqlite_harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await sqlite_harness.logged_in(anna)
    own = {"Host": f"{host}:8080", "Origin": f"http://{host}:8080"}
    response = await sqlite_harness.client.post("/api/consults", json={}, headers=own)
    assert response.status == 201, await response.text()
    created = await response.json()
    assert created["invite_url"].startswith(f"http://{host}:8080/join/")


async def test_with_a_public_url_links_use_it_whatever_the_host(
    make_settings: SettingsFactory, clock: Any, aiohttp_client: Any
) -> None:
    public = "http://video.praktijk-noord.example"
    app = create_app(make_settings(server_public_url=public), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    harness.origin = public
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(anna)
    response = await harness.client.post(
        "/api/consults", json={}, headers={"Host": "evil.example", "Origin": public}
    )
    assert response.status == 201, await response.text()
    assert (await response.json())["invite_url"].startswith(f"{public}/join/")
