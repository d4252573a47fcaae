"""Shared fixtures: settings on a temporary data directory, real PostgreSQL and Redis,
and a real Chromium for the browser tests.

A test that needs PostgreSQL, Redis or Chromium skips with the reason when it
cannot be reached or started, except under ``CI=true``, where it fails: CI
never passes on skipped real-service tests.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import pytest
import redis.asyncio as aioredis
import structlog
from playwright.async_api import Browser, Page, async_playwright
from sqlalchemy.engine import make_url

from audit.clock import ManualClock
from config import Settings, load_settings
from server import create_app
from server.resources import ROOM_TIMER_POLL
from tests.browser import (
    TWO_CAMERAS,
    WITHOUT_CAMERA,
    BrowserUnavailable,
    ScreenshotSaver,
    chromium_executable,
    directory_for_test,
    launch_chromium,
    save_screenshot,
    screenshots_dir,
)
from tests.harness import Harness, Sockets

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
POSTGRES_ADMIN_URL = os.environ.get(
    "VIDEOCONSULT_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("VIDEOCONSULT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

SettingsFactory = Callable[..., Settings]

# argon2id at its production cost takes ~0.1 s per hash; tests hash a lot.
# test_passwords.py checks the production defaults separately.
CHEAP_PASSWORD_HASHING = {
    "VIDEOCONSULT_ACCOUNTS_ARGON2_TIME_COST": "1",
    "VIDEOCONSULT_ACCOUNTS_ARGON2_MEMORY_KIB": "1024",
    "VIDEOCONSULT_ACCOUNTS_ARGON2_PARALLELISM": "1",
}

_reachability: dict[str, str | None] = {}


def service_unavailable(service: str, reason: str) -> NoReturn:
    """Skip the test, or under CI=true fail it, because ``service`` is missing."""
    if IN_CI:
        pytest.fail(f"{service} is required when CI=true, but {reason}", pytrace=False)
    pytest.skip(f"{service} not reachable ({reason}); start it to run this test")


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _postgres_problem() -> str | None:
    if "postgres" not in _reachability:
        try:
            connection = await asyncpg.connect(_asyncpg_dsn(POSTGRES_ADMIN_URL), timeout=3)
            await connection.close()
            _reachability["postgres"] = None
        except (OSError, asyncpg.PostgresError, TimeoutError) as err:
            _reachability["postgres"] = f"{POSTGRES_ADMIN_URL}: {type(err).__name__}: {err}"
    return _reachability["postgres"]


async def _redis_problem() -> str | None:
    if "redis" not in _reachability:
        client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        try:
            await client.ping()
            _reachability["redis"] = None
        except (OSError, aioredis.RedisError) as err:
            _reachability["redis"] = f"{REDIS_URL}: {type(err).__name__}: {err}"
        finally:
            await client.aclose()
    return _reachability["redis"]


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for this test; dropped afterwards."""
    problem = await _postgres_problem()
    if problem:
        service_unavailable("PostgreSQL", problem)
    name = f"vc_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(_asyncpg_dsn(POSTGRES_ADMIN_URL), timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    admin = await asyncpg.connect(_asyncpg_dsn(POSTGRES_ADMIN_URL), timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def redis_url() -> str:
    """The URL of the real Redis server (a database number of its own for tests)."""
    problem = await _redis_problem()
    if problem:
        service_unavailable("Redis", problem)
    return REDIS_URL


# What the tests of a module marked ``signaling_backends`` run on: the two
# databases with the in-process broker, and PostgreSQL with the Redis broker,
# room store and timers (as several nodes would).
WITH_REDIS = "postgresql+redis"
SIGNALING_BACKENDS = ("sqlite", "postgresql", WITH_REDIS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "signaling_backends: run the module's harness tests on the in-process broker "
        "(SQLite, PostgreSQL) and on the real Redis",
    )


@pytest.hookimpl(tryfirst=True)  # before the fixture's own params are applied
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "signaling_backends"
    ):
        # As a marker, which pytest then treats as the test's own parametrize
        # (it replaces the fixture's params instead of clashing with them).
        metafunc.definition.add_marker(
            pytest.mark.parametrize("database_url", SIGNALING_BACKENDS, indirect=True)
        )
    if "sqlite_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "signaling_backends"
    ):
        metafunc.parametrize("sqlite_backend", ["in-process", "redis"], indirect=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each database test runs twice: on SQLite (empty URL) and on PostgreSQL
    (and, in modules marked ``signaling_backends``, once more with Redis)."""
    if request.param == "sqlite":
        return ""
    url: str = request.getfixturevalue("postgres_url")
    return url


def _backend(request: pytest.FixtureRequest) -> str:
    callspec = getattr(request.node, "callspec", None)
    params: dict[str, object] = callspec.params if callspec is not None else {}
    return str(params.get("database_url", ""))


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own on the real Redis; its keys are deleted afterwards."""
    prefix = f"vc-test-{secrets.token_hex(6)}"
    yield prefix
    client = aioredis.Redis.from_url(redis_url)
    try:
        async for key in client.scan_iter(match=f"{prefix}:*", count=500):
            await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make_settings(data_dir: Path) -> SettingsFactory:
    """Build settings from the real defaults, with a temporary data directory.

    Keyword arguments are settings by their environment name without the
    prefix: ``make_settings(database_url=..., redis_url=...)``.
    """

    def _make(**overrides: Any) -> Settings:
        environ = {
            "VIDEOCONSULT_DATA_DIR": str(data_dir),
            **CHEAP_PASSWORD_HASHING,
            # Tests make hundreds of requests from 127.0.0.1 in one app;
            # tests/test_client_limits.py sets the limit it tests.
            "VIDEOCONSULT_SECURITY_CLIENT_REQUESTS_PER_MIN": "0",
        }
        for name, value in overrides.items():
            environ[f"VIDEOCONSULT_{name.upper()}"] = str(value)
        return load_settings(environ)

    return _make


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Undo any logging set-up a test made, so tests cannot leak into each other."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = False


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 23, 9, 0, tzinfo=UTC))


@pytest.fixture
def harness_settings(
    make_settings: SettingsFactory, database_url: str, request: pytest.FixtureRequest
) -> Settings:
    """The ``harness``'s settings: its database, and Redis under a prefix of its own
    when the test runs on Redis."""
    overrides: dict[str, str] = {"database_url": database_url}
    if _backend(request) == WITH_REDIS:
        overrides["redis_url"] = request.getfixturevalue("redis_url")
        overrides["redis_key_prefix"] = request.getfixturevalue("redis_prefix")
    return make_settings(**overrides)


@pytest.fixture
async def harness(harness_settings: Settings, clock: ManualClock, aiohttp_client: Any) -> Harness:
    """The real app on SQLite and on PostgreSQL, with a manual clock (and in
    modules marked ``signaling_backends``, on PostgreSQL and the real Redis).

    ``harness_settings`` comes first: the app stops before Redis keys are deleted."""
    app = create_app(harness_settings, clock=clock)
    # The tests move the manual clock and fire the due timers themselves: the
    # app's own timer task, on Redis, would race them for each timer.
    app[ROOM_TIMER_POLL] = 3600.0
    client = await aiohttp_client(app)
    return Harness(app, client, clock)


@pytest.fixture
def sqlite_backend(request: pytest.FixtureRequest) -> str:
    """In-process, or (in modules marked ``signaling_backends``) also Redis."""
    return str(getattr(request, "param", "in-process"))


@pytest.fixture
def sqlite_settings(
    make_settings: SettingsFactory, sqlite_backend: str, request: pytest.FixtureRequest
) -> Settings:
    if sqlite_backend != "redis":
        return make_settings()
    return make_settings(
        redis_url=request.getfixturevalue("redis_url"),
        redis_key_prefix=request.getfixturevalue("redis_prefix"),
    )


@pytest.fixture
async def sqlite_harness(
    sqlite_settings: Settings, sqlite_backend: str, clock: ManualClock, aiohttp_client: Any
) -> Harness:
    """The real app on SQLite only, for tests about HTTP rather than storage (in
    modules marked ``signaling_backends`` once more on Redis)."""
    app = create_app(sqlite_settings, clock=clock)
    if sqlite_backend == "redis":
        app[ROOM_TIMER_POLL] = 3600.0  # as in ``harness``
    client = await aiohttp_client(app)
    return Harness(app, client, clock)


@pytest.fixture
async def sockets(harness: Harness) -> AsyncIterator[Sockets]:
    helper = Sockets(harness)
    yield helper
    await helper.close()


@pytest.fixture
async def sqlite_sockets(sqlite_harness: Harness) -> AsyncIterator[Sockets]:
    helper = Sockets(sqlite_harness)
    yield helper
    await helper.close()


@pytest.fixture
async def chromium(live_harness: Harness) -> AsyncIterator[Browser]:
    """Headless Chromium (Debian's, or ``VIDEOCONSULT_TEST_CHROMIUM``) on a fresh
    temporary profile, with a fake camera and microphone; closed afterwards.

    One per test: Playwright is bound to the event loop it started on, and
    each test runs on a loop of its own; launching takes well under a second.
    It depends on ``live_harness`` so that it closes before the server stops:
    otherwise its pages would reconnect to a server that is shutting down.
    """
    async for browser in _chromium(()):
        yield browser


@pytest.fixture
async def chromium_without_camera(live_harness: Harness) -> AsyncIterator[Browser]:
    """As ``chromium``, but the browser has a (fake) microphone and no camera."""
    async for browser in _chromium(WITHOUT_CAMERA):
        yield browser


@pytest.fixture
async def chromium_two_cameras(live_harness: Harness) -> AsyncIterator[Browser]:
    """As ``chromium``, with two fake cameras to choose from."""
    async for browser in _chromium(TWO_CAMERAS):
        yield browser


async def _chromium(extra_args: tuple[str, ...]) -> AsyncIterator[Browser]:
    executable = chromium_executable()
    problem = _reachability.get(f"chromium:{executable}")
    if problem:
        service_unavailable("Chromium", problem)
    async with async_playwright() as playwright:
        try:
            browser = await launch_chromium(playwright, executable, extra_args=extra_args)
        except BrowserUnavailable as err:
            _reachability[f"chromium:{executable}"] = str(err)
            service_unavailable("Chromium", str(err))
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def live_harness(sqlite_harness: Harness) -> Harness:
    """The real app on SQLite, served by a real TestServer on 127.0.0.1 that a
    browser reaches at ``live_harness.origin``; the Origin check accepts its
    requests (no public_url is configured, so the request's own origin counts)."""
    return sqlite_harness


@pytest.fixture
def screenshot(request: pytest.FixtureRequest) -> ScreenshotSaver:
    """``await screenshot(page, "patient-waiting-room")`` saves a PNG under
    screenshots_dir()/<test name>/ and returns its path."""
    directory = screenshots_dir() / directory_for_test(request.node.name)

    async def save(page: Page, name: str) -> Path:
        return await save_screenshot(page, directory, name)

    return save
