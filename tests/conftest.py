"""Shared fixtures: settings on a temporary data directory, real PostgreSQL and Redis,
and a real Chromium for the browser tests.

A test that needs PostgreSQL, Redis or Chromium skips with the reason when it
cannot be reached or started, except under ``CI=true``, where it fails: CI
never passes on skipped real-service tests.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import signal
import sys
import threading
import traceback
import types
from collections.abc import AsyncIterator, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from playwright.async_api import Browser, Page, async_playwright
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import create_engine, prepare_data_dir, upgrade
from audit.clock import ManualClock
from audit.db import database_url as configured_url
from config import Settings, load_settings
from server import create_app
from server.resources import ROOM_TIMER_POLL
from tests.support.browser import (
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
from tests.support.databases import (
    PostgresCopies,
    copy_sqlite_template,
    create_database,
    drop_database,
    make_postgres_template,
    make_sqlite_template,
    run_outside_the_test_loop,
)
from tests.support.harness import Harness, Sockets
from tests.support.own_postgres import OwnPostgres, own_postgres_server
from tests.support.ports import unused_port
from tests.support.services import (
    POSTGRES_ADMIN_URL,
    REDIS_URL,
    postgres_problem,
    reachability,
    redis_problem,
    service_unavailable,
)
from tests.support.settings import CHEAP_PASSWORD_HASHING, SettingsFactory


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for this test; dropped afterwards."""
    problem = await postgres_problem()
    if problem:
        service_unavailable("PostgreSQL", problem)
    url = await create_database(POSTGRES_ADMIN_URL)
    yield url
    collect_leaked_asyncpg_connections()
    await drop_database(POSTGRES_ADMIN_URL, url)


def collect_leaked_asyncpg_connections() -> int:
    """Collect the asyncpg connections a cancelled task left behind; return how many.

    asyncpg leaks a connection when the task using it is cancelled while it
    connects or closes (asyncpg #1156, SQLAlchemy #12077: known, not fixed
    upstream); a test whose app shuts down mid-request can do that. The
    garbage collector then reports the connection, its socket and its
    transport as unraisable at some later test, which the suite's "error"
    filter fails: an innocent test, now and then. Collected here, at the end
    of the test that used the database, those three are let go; every other
    unraisable goes on to pytest as before.
    """
    original = sys.unraisablehook
    leaked = 0

    def hook(unraisable: Any) -> None:
        nonlocal leaked
        text = str(unraisable.exc_value)
        if "unclosed connection <asyncpg.connection.Connection" in text:
            leaked += 1
            return
        # The leaked connection's own socket (to PostgreSQL's port) and its
        # transport, reported with it or (the connection object collected
        # earlier) alone.
        if text.startswith("unclosed <socket.socket") and "5432)>" in text:
            leaked += 1
            return
        if leaked and text.startswith("unclosed transport <_SelectorSocketTransport"):
            return
        original(unraisable)

    sys.unraisablehook = hook
    try:
        gc.collect()
    finally:
        sys.unraisablehook = original
    # What survived is kept (modules, fixtures of wider scope, pytest's own
    # reports): freeze it, so that the next test's collection looks only at
    # what that test made (a full collection of a long-running worker's heap
    # took 0.3 to 0.8 s, at every PostgreSQL test).
    gc.freeze()
    return leaked


@pytest.fixture(scope="session")
def postgres_copies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCopies]:
    """Copies of a PostgreSQL database migrated to head once per session."""
    problem = run_outside_the_test_loop(postgres_problem)
    if problem:
        service_unavailable("PostgreSQL", problem)
    template = run_outside_the_test_loop(
        lambda: make_postgres_template(POSTGRES_ADMIN_URL, tmp_path_factory.mktemp("pg-template"))
    )
    copies = PostgresCopies(POSTGRES_ADMIN_URL, template)
    try:
        yield copies
    finally:
        copies.close()
        run_outside_the_test_loop(lambda: drop_database(POSTGRES_ADMIN_URL, template))


@pytest.fixture
async def migrated_postgres_url(postgres_copies: PostgresCopies) -> AsyncIterator[str]:
    """A PostgreSQL database of this test's own at the current schema (a copy of
    the session's template); dropped afterwards."""
    url = await postgres_copies.take()
    yield url
    collect_leaked_asyncpg_connections()
    postgres_copies.drop(url)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A PostgreSQL server of this test's own, for drills that restart it (the
    shared one never is): initdb in a temporary directory, started on a free
    port; stopped and deleted afterwards (``tests/support/own_postgres.py``)."""
    with own_postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database file migrated to head once per session, for copies."""
    return make_sqlite_template(tmp_path_factory.mktemp("sqlite-template"))


@pytest.fixture
async def redis_url() -> str:
    """The URL of the real Redis server (a database number of its own for tests)."""
    problem = await redis_problem()
    if problem:
        service_unavailable("Redis", problem)
    return REDIS_URL


# What the tests of a module marked ``signaling_backends`` run on: the two
# databases with the in-process broker, and PostgreSQL with the Redis broker,
# room store and timers (as several nodes would). The quick check
# (``-m "not slow"``) leaves out PostgreSQL with the in-process broker: each of
# its two parts is still tested there, the broker on SQLite and the database
# with Redis, and its set-up (a database copy) is the most costly of the three.
WITH_REDIS = "postgresql+redis"
SIGNALING_BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.slow), WITH_REDIS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "signaling_backends: run the module's harness tests on the in-process broker "
        "(SQLite, PostgreSQL) and on the real Redis",
    )
    config.addinivalue_line(
        "markers",
        "settings(**overrides): settings of the test's harness app, by their "
        "environment name without the prefix (consults_invite_validity_s=60)",
    )


# Tests with these markers take seconds each; they are slow too, so that
# ``-m "not slow"`` is the quick check (README, "Running part of the tests").
IMPLY_SLOW = ("browser", "webrtc", "multinode", "recorder")


def pytest_collection_finish(session: pytest.Session) -> None:
    # Every test module is imported now: freeze what is there, so that the
    # cycle collector, automatic or called by a test, never walks it again.
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(name) for name in IMPLY_SLOW):
            item.add_marker(pytest.mark.slow)
            # No xdist_group here: pytest-xdist's worker reads the groups in
            # its own pytest_collection_modifyitems, which runs before this
            # one, so a group added here never grouped anything (these tests
            # have always run two at a time under -n 2, in ./scripts/test's
            # second step and beside the other tests with arguments).


@pytest.hookimpl(hookwrapper=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Generator[None, None, None]:
    """When pytest-timeout's alarm goes off (pyproject.toml), print where every
    task of the running event loop and every async generator (an async
    fixture) waits, before the plugin fails the test: a hang in async code
    waits in the loop, not in a thread, and the await it is stuck at says
    why. It goes to the test's captured stderr, shown with the failure."""
    yield
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return
    fail_the_test = signal.getsignal(signal.SIGALRM)
    if not callable(fail_the_test):
        return

    def on_alarm(signum: int, frame: Any) -> None:
        print_awaits(sys.stderr)
        fail_the_test(signum, frame)

    signal.signal(signal.SIGALRM, on_alarm)


def print_awaits(out: Any) -> None:
    """Each task of the running loop and each async generator suspended in an
    await, with the chain of awaits it waits in (innermost last)."""
    try:
        tasks = asyncio.all_tasks(asyncio.get_running_loop())
    except RuntimeError:
        tasks = set()
    waiting: list[tuple[str, Any]] = [(repr(task), task.get_coro()) for task in tasks]
    waiting += [
        (f"async generator {agen.__qualname__}", agen)
        for agen in gc.get_objects()
        if isinstance(agen, types.AsyncGeneratorType) and agen.ag_await is not None
    ]
    print(f"\nAt the timeout, {len(waiting)} awaits:", file=out)
    for title, awaitable in waiting:
        print(f"--- {title}", file=out)
        while awaitable is not None:
            frame = _attribute(awaitable, "cr_frame", "ag_frame", "gi_frame")
            if frame is not None:
                print("".join(traceback.format_stack(frame, limit=1)), end="", file=out)
            awaitable = _attribute(awaitable, "cr_await", "ag_await", "gi_yieldfrom")


def _attribute(thing: object, *names: str) -> Any:
    """The first of these attributes that ``thing`` has and that is not None."""
    return next(
        (value for name in names if (value := getattr(thing, name, None)) is not None), None
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
def database_url(request: pytest.FixtureRequest, data_dir: Path) -> str:
    """Each database test runs twice: on SQLite (empty URL: the file in
    ``data_dir``) and on PostgreSQL (and, in modules marked
    ``signaling_backends``, once more with Redis). The database is already at
    the current schema, a copy of the session's template, so the app migrates
    nothing at its start; tests of migrating use ``empty_database_url``."""
    if request.param == "sqlite":
        copy_sqlite_template(request.getfixturevalue("sqlite_template"), data_dir)
        return ""
    url: str = request.getfixturevalue("migrated_postgres_url")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest) -> str:
    """As ``database_url``, but the database is empty: no table, no revision."""
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
            # The app runs in the test's own thread, with its aiortc peers
            # coding video there: at real-time priority while it records, it
            # would starve Chromium and the other test worker on CI's two
            # cores. tests/test_scheduling_realtime.py turns it on where it tests it.
            "VIDEOCONSULT_RECORDING_LOOP_REALTIME": "false",
        }
        for name, value in overrides.items():
            environ[f"VIDEOCONSULT_{name.upper()}"] = str(value)
        return load_settings(environ)

    return _make


@pytest.fixture
def free_port() -> int:
    """A port on 127.0.0.1 that nothing uses (:mod:`tests.support.ports`)."""
    return unused_port()


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Undo any logging set-up a test made, so tests cannot leak into each other."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    server_log = logging.getLogger("aiohttp.server")
    server_filters = list(server_log.filters)
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = False
    server_log.filters[:] = server_filters


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
    marker = request.node.get_closest_marker("settings")
    if marker is not None:
        overrides.update(marker.kwargs)
    if _backend(request) == WITH_REDIS:
        overrides["redis_url"] = request.getfixturevalue("redis_url")
        overrides["redis_key_prefix"] = request.getfixturevalue("redis_prefix")
    return make_settings(**overrides)


@pytest.fixture
async def migrated_engine(
    make_settings: SettingsFactory, database_url: str
) -> AsyncIterator[AsyncEngine]:
    """An engine on ``database_url``'s database, migrated, without an app.

    The connect timeout is also how long a writer waits for SQLite's lock: a
    busy host once took longer than the default 5 s for 300 appends at once.
    """
    settings = make_settings(database_url=database_url, database_connect_timeout_s=30)
    engine = create_engine(
        configured_url(settings, prepare_data_dir(settings.data_dir)),
        connect_timeout_s=settings.database.connect_timeout_s,
    )
    await upgrade(engine)
    yield engine
    await engine.dispose()


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
    make_settings: SettingsFactory,
    sqlite_backend: str,
    sqlite_template: Path,
    data_dir: Path,
    request: pytest.FixtureRequest,
) -> Settings:
    """Settings on a SQLite database at the current schema (a copy of the
    template), with a ``settings`` marker's, as ``harness_settings``."""
    copy_sqlite_template(sqlite_template, data_dir)
    marker = request.node.get_closest_marker("settings")
    overrides: dict[str, Any] = {} if marker is None else dict(marker.kwargs)
    if sqlite_backend == "redis":
        overrides["redis_url"] = request.getfixturevalue("redis_url")
        overrides["redis_key_prefix"] = request.getfixturevalue("redis_prefix")
    return make_settings(**overrides)


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
    problem = reachability.get(f"chromium:{executable}")
    if problem:
        service_unavailable("Chromium", problem)
    async with async_playwright() as playwright:
        try:
            browser = await launch_chromium(playwright, executable, extra_args=extra_args)
        except BrowserUnavailable as err:
            reachability[f"chromium:{executable}"] = str(err)
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
