"""nginx in front of two nodes, with deploy/nginx/nginx.conf as it is.

Debian's nginx (``/usr/sbin/nginx``) runs the config with only what is this
machine's changed (``local_config``: the nodes' and its own address, the
user, where the pid file, logs and temporary files go) in front of two real
``videoconsult serve`` processes. The nodes share what docker-compose.yml
makes them share, the real PostgreSQL and Redis (under a key prefix of this
test's own), a master key and the public URL, and nothing else: a data
directory each. Accounts and consults are made through an in-process app on
the same database.

Only HTTP and the WebSocket upgrade through the proxy are tested here, never
a consult whose participants are on two nodes (tests/test_multinode.py).
The tests that run nginx skip without it, and fail under CI=true; the first
few only read the config.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pwd
import re
import secrets
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientWebSocketResponse
from sqlalchemy.engine import make_url

from audit.clock import ManualClock
from audit.db import create_engine
from audit.migrate import ensure_current
from config import load_settings
from server import create_app
from tests.support.deploy import NGINX_CONF, nginx_config, nginx_directives, nginx_upstream_servers
from tests.support.harness import Harness, new_consult, receive, wait_until_listening
from tests.support.ports import unused_port
from tests.support.processes import ServerProcess, session_cookie
from tests.support.services import service_unavailable
from tests.support.settings import SettingsFactory

pytestmark = pytest.mark.multinode

NGINX = "/usr/sbin/nginx"
DEFAULTS = load_settings({})
# Addresses a browser might have, as the TLS proxy in front reports them.
BROWSER = "203.0.113.7"
OTHER_BROWSER = "203.0.113.8"

Launch = Callable[..., Awaitable["Deployment"]]


def seconds(value: str) -> float:
    """An nginx time ("3600s", "1m", "500ms") in seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert match, f"not an nginx time: {value}"
    number, unit = int(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def size_bytes(value: str) -> int:
    """An nginx size ("128k", "1m", "4096") in bytes."""
    match = re.fullmatch(r"(\d+)([kKmM])?", value)
    assert match, f"not an nginx size: {value}"
    factor = {"k": 1024, "m": 1024 * 1024}.get((match.group(2) or "").lower(), 1)
    return int(match.group(1)) * factor


def location(pattern: str) -> str:
    """The body of the location block whose modifier and URI match ``pattern``."""
    (body,) = re.findall(rf"location\s+{pattern}\s*\{{([^}}]*)\}}", nginx_config())
    return body


def local_config(text: str, *, directory: Path, port: int, upstreams: list[str], user: str) -> str:
    """nginx.conf for this machine: only addresses, the user and paths change."""
    replacements = [
        ("user nginx;", f"user {user};"),
        ("pid /var/run/nginx.pid;", f"pid {directory}/nginx.pid;"),
        ("/var/log/nginx/access.log", f"{directory}/access.log"),
        ("/var/log/nginx/error.log", f"{directory}/error.log"),
        ("listen 8080;", f"listen 127.0.0.1:{port};"),
    ]
    servers = nginx_upstream_servers()
    assert len(servers) == len(upstreams), "a node per upstream server"
    replacements += [
        (f"server {found} ", f"server {ours} ")
        for found, ours in zip(servers, upstreams, strict=True)
    ]
    for old, new in replacements:
        assert text.count(old) == 1, f"nginx.conf should hold {old!r} exactly once"
        text = text.replace(old, new)
    # Where this machine keeps nginx's temporary files (Debian's built-in
    # paths are under /var/lib/nginx), like the pid file: not under test.
    temporary = "".join(
        f"    {kind}_temp_path {directory}/{kind}_temp;\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    assert text.count("http {\n") == 1
    return text.replace("http {\n", "http {\n" + temporary)


class Proxy:
    """Debian's nginx with the project's config, in front of the given nodes."""

    def __init__(self, directory: Path, port: int, upstreams: list[str]) -> None:
        self.directory = directory
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"
        directory.mkdir(parents=True)
        self.config = directory / "nginx.conf"
        self.config.write_text(
            local_config(
                NGINX_CONF.read_text(encoding="utf-8"),
                directory=directory,
                port=port,
                upstreams=upstreams,
                # Workers run as this user; as root that is root.
                user=pwd.getpwuid(os.geteuid()).pw_name,
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self, *extra: str) -> list[str]:
        return [
            NGINX,
            "-p",
            str(self.directory),
            "-c",
            str(self.config),
            # Before the config names its own error log, nginx logs here.
            "-e",
            str(self.directory / "startup.log"),
            *extra,
        ]

    def start(self) -> None:
        checked = subprocess.run(
            self._command("-t"), capture_output=True, text=True, timeout=30, check=False
        )
        assert checked.returncode == 0, f"nginx refuses the config:\n{checked.stderr}"
        self.process = subprocess.Popen(
            self._command("-g", "daemon off;"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until_listening("nginx", self.port, self.process)
        except AssertionError as err:
            pytest.fail(f"{err}: {self.startup_log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def startup_log(self) -> str:
        path = self.directory / "startup.log"
        return path.read_text() if path.exists() else ""

    def access_log(self, *, lines: int = 0) -> list[str]:
        """The access log once it has at least ``lines`` lines: nginx writes a
        request's line just after the response, a WebSocket's when it closes."""
        path = self.directory / "access.log"
        deadline = time.monotonic() + 5
        while True:
            found = path.read_text().splitlines() if path.exists() else []
            if len(found) >= lines or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text() if path.exists() else ""

    def upstreams_of(self, line: str) -> list[str]:
        """The nodes an access-log line says nginx tried, in order."""
        match = re.search(r"upstream=(.*?) upstream_status=", line)
        assert match, line
        return [found.strip() for found in match.group(1).split(",")]


@dataclass
class Deployment:
    proxy: Proxy
    nodes: list[ServerProcess]

    @property
    def origin(self) -> str:
        return self.proxy.origin

    @property
    def headers(self) -> dict[str, str]:
        return {"Origin": self.origin}

    def node_address(self, node: ServerProcess) -> str:
        return f"127.0.0.1:{node.port}"


@pytest.fixture
def master_key() -> str:
    """The deployment's master key, the same on every node."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
async def launch(
    postgres_url: str, redis_url: str, redis_prefix: str, master_key: str, tmp_path: Path
) -> AsyncIterator[Launch]:
    """Start two nodes at once on the empty database and nginx in front of
    them, once per test; ``await launch(**settings)`` takes more settings for
    both nodes."""
    if not os.access(NGINX, os.X_OK):
        service_unavailable("nginx", f"{NGINX} is not installed (Debian package nginx)")
    proxies: list[Proxy] = []
    nodes: list[ServerProcess] = []

    async def _launch(**extra: str) -> Deployment:
        port = unused_port()
        shared = {
            "database_url": postgres_url,
            "redis_url": redis_url,
            "redis_key_prefix": redis_prefix,
            "security_master_key": master_key,
            "server_public_url": f"http://127.0.0.1:{port}",
            "server_trusted_proxies": "127.0.0.1",
            **extra,
        }
        started = [
            ServerProcess(tmp_path / name, unused_port(), tmp_path / f"{name}.log", shared)
            for name in ("server-a", "server-b")
        ]
        nodes.extend(started)
        proxy = Proxy(tmp_path / "proxy", port, [f"127.0.0.1:{node.port}" for node in started])
        proxies.append(proxy)
        await asyncio.to_thread(proxy.start)
        for node in started:
            await asyncio.to_thread(node.wait_healthy)
        return Deployment(proxy, started)

    try:
        yield _launch
    finally:
        for proxy in proxies:
            proxy.stop()
        for node in nodes:
            node.stop()


@pytest.fixture
async def make_harness(
    make_settings: SettingsFactory, postgres_url: str, master_key: str, aiohttp_client: Any
) -> Callable[[], Awaitable[Harness]]:
    """An in-process app on the nodes' database with their master key, for
    accounts and consults; made after ``launch`` so that the nodes find the
    database empty."""

    async def _harness() -> Harness:
        # The nodes run on the real time, so the harness's clock starts there.
        clock = ManualClock(datetime.now(UTC))
        settings = make_settings(database_url=postgres_url, security_master_key=master_key)
        app = create_app(settings, clock=clock)
        return Harness(app, await aiohttp_client(app), clock)

    return _harness


async def get_status(http: ClientSession, url: str, **kwargs: Any) -> int:
    async with http.get(url, **kwargs) as answer:
        await answer.read()
        return answer.status


async def upgrade_refusal(http: ClientSession, url: str, origin: str) -> tuple[int, Any]:
    """Ask for a WebSocket and return the status and JSON body of the refusal."""
    headers = {
        "Origin": origin,
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(secrets.token_bytes(16)).decode(),
    }
    async with http.get(url, headers=headers) as answer:
        return answer.status, await answer.json()


# --- the config, read -------------------------------------------------------


def test_webopenedtimeouts_outlast_the_heartbeat_many_times_over() -> None:
    body = location("=\\s*/ws")
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        (arguments,) = nginx_directives(directive, body)
        assert seconds(arguments[0]) >= 10 * DEFAULTS.signaling.heartbeat_s


def test_an_admins_paced_verify_of_a_million_records_is_not_cut_off() -> None:
    """Paced at the default share (0.1), a verify of a million records took
    83 to 114 s before its answer (docs/benchmarks.md); nginx's default
    wait for an answer is 60 s, and would answer 504 instead."""
    assert DEFAULTS.database.bulk_share == 0.1
    body = location("=\\s*/api/admin/access-log/verify")
    (arguments,) = nginx_directives("proxy_read_timeout", body)
    assert seconds(arguments[0]) >= 600
    assert nginx_directives("proxy_pass", body) == [["http://videoconsult"]]
    # Found in review: "error timeout" would start a second verify on another node.
    assert nginx_directives("proxy_next_upstream", body) == [["error"]]


def test_bodies_the_server_accepts_pass_and_none_is_written_to_disk() -> None:
    (limit,) = nginx_directives("client_max_body_size")
    (buffer,) = nginx_directives("client_body_buffer_size")
    assert size_bytes(limit[0]) > DEFAULTS.server.max_body_bytes
    assert size_bytes(buffer[0]) >= size_bytes(limit[0]), "a body would go to a temporary file"
    assert nginx_directives("proxy_max_temp_file_size") == [["0"]], "responses neither"


def test_the_log_format_names_no_path_query_client_or_header() -> None:
    ((name, *parts),) = nginx_directives("log_format")
    variables = set(re.findall(r"\$(\w+)", " ".join(parts)))
    # Times, sizes, outcomes and which node: nothing a request or browser says.
    harmless = {
        "time_iso8601",
        "time_local",
        "msec",
        "request_method",
        "status",
        "body_bytes_sent",
        "bytes_sent",
        "request_length",
        "request_time",
        "upstream_addr",
        "upstream_status",
        "upstream_connect_time",
        "upstream_response_time",
    }
    assert variables <= harmless, variables - harmless
    assert nginx_directives("access_log") == [["/var/log/nginx/access.log", name]]
    ((_path, level),) = nginx_directives("error_log")
    assert level in ("crit", "alert", "emerg"), "errors carry the request line and client"


def test_the_upgrade_headers_and_forwarding_headers_go_to_the_nodes() -> None:
    headers = {arguments[0]: arguments[1] for arguments in nginx_directives("proxy_set_header")}
    assert headers["Upgrade"] == "$http_upgrade"
    assert headers["Connection"] == "$connection_upgrade"
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert "X-Forwarded-Proto" in headers
    assert "Host" in headers
    assert nginx_directives("proxy_http_version") == [["1.1"]]


# --- the config, run ----------------------------------------------------------


async def test_two_nodes_started_at_once_on_an_empty_database_both_come_up(
    launch: Launch, postgres_url: str, tmp_path: Path
) -> None:
    deployment = await launch()
    async with ClientSession() as http:
        for node in deployment.nodes:
            assert await get_status(http, f"{node.origin}/readyz") == 200
    # One migrated while the other waited for its lock, then found nothing to do.
    engine = create_engine(make_url(postgres_url), connect_timeout_s=5)
    try:
        await ensure_current(engine)
    finally:
        await engine.dispose()
    logs = "".join(path.read_text() for path in tmp_path.glob("server-*.log"))
    assert "Traceback" not in logs


async def test_requests_are_spread_over_both_nodes_and_go_to_the_other_when_one_dies(
    launch: Launch,
) -> None:
    deployment = await launch()
    node_a, node_b = deployment.nodes
    a, b = deployment.node_address(node_a), deployment.node_address(node_b)
    async with ClientSession() as http:
        for _ in range(6):
            assert await get_status(http, f"{deployment.origin}/healthz") == 200
        log = deployment.proxy.access_log(lines=6)
        tried = [deployment.proxy.upstreams_of(line) for line in log]
        assert {upstreams[0] for upstreams in tried} == {a, b}

        node_b.kill()
        for _ in range(6):
            assert await get_status(http, f"{deployment.origin}/healthz") == 200
    log = deployment.proxy.access_log(lines=12)
    assert len(log) == 12, log
    after = [deployment.proxy.upstreams_of(line) for line in log[6:]]
    # The first request for B found it gone and went on to A; then B was
    # left out (fail_timeout) and A served everything at once.
    assert after[0] == [b, a] or after[1] == [b, a], after
    assert after[-1] == [a], after


async def test_a_therapist_webopenedopens_through_the_proxy_on_either_node(
    launch: Launch, make_harness: Callable[[], Awaitable[Harness]]
) -> None:
    deployment = await launch()
    app = await make_harness()
    first = await new_consult(app)
    created = await app.post("/api/consults", {})
    assert created.status == 201, await created.text()
    second = (await created.json())["consult"]["id"]
    headers = {**deployment.headers, "Cookie": f"vc_session={session_cookie(app)}"}
    async with ClientSession() as http:
        # Two consults, one socket each: the proxy's turns put them on both nodes.
        sockets: list[ClientWebSocketResponse] = []
        for consult_id in (first.consult_id, second):
            opened = await http.ws_connect(
                f"{deployment.origin}/ws?consult={consult_id}", headers=headers
            )
            sockets.append(opened)
            welcome = await receive(opened, "welcome")
            assert welcome["state"] == "waiting"
        # Frames go both ways: a message the server does not know gets an error.
        for opened in sockets:
            await opened.send_json({"v": 1, "type": "no-such-message"})
            assert (await opened.receive_json(timeout=5))["type"] == "error"
            await opened.close()
    upgraded = [line for line in deployment.proxy.access_log(lines=2) if "status=101" in line]
    assert len(upgraded) == 2, upgraded
    assert {deployment.proxy.upstreams_of(line)[0] for line in upgraded} == {
        deployment.node_address(node) for node in deployment.nodes
    }


async def test_metrics_are_not_served_through_the_proxy(launch: Launch) -> None:
    deployment = await launch()
    async with ClientSession() as http:
        # The node serves them to a direct client on loopback ...
        node = deployment.nodes[0]
        assert await get_status(http, f"{node.origin}/metrics") == 200
        # ... and the proxy to nobody, however the path is written.
        for path in ("/metrics", "/metrics/", "//metrics", "/metrics?name=x", "/metrics.txt"):
            assert await get_status(http, f"{deployment.origin}{path}") == 404, path
    log = deployment.proxy.access_log(lines=5)
    assert len(log) == 5, log
    for line in log:
        assert deployment.proxy.upstreams_of(line) == ["-"], "a node was asked"


async def test_lockouts_count_each_browser_behind_the_proxy_across_both_nodes(
    launch: Launch,
) -> None:
    deployment = await launch(accounts_client_max_failures="2")

    async def login(http: ClientSession, browser: str) -> int:
        body = {
            "email": f"nobody-{uuid.uuid4().hex[:8]}@praktijk-noord.example",
            "password": "not the password",
            "code": "123456",
        }
        headers = {**deployment.headers, "X-Forwarded-For": browser}
        async with http.post(f"{deployment.origin}/api/login", json=body, headers=headers) as r:
            return r.status

    async with ClientSession() as http:
        # Each attempt another e-mail address, on the node whose turn it is:
        # what locks is the browser's address, counted in the shared database
        # under a hash keyed with the shared master key.
        assert [await login(http, BROWSER) for _ in range(2)] == [401, 401]
        assert await login(http, BROWSER) == 429
        assert await login(http, OTHER_BROWSER) == 401
    log = deployment.proxy.access_log(lines=4)
    tried = {deployment.proxy.upstreams_of(line)[0] for line in log}
    assert len(tried) == 2, "both nodes took part"


async def test_a_body_too_large_for_the_server_is_refused_by_the_server_itself(
    launch: Launch,
) -> None:
    deployment = await launch()
    body = b"{" + b" " * DEFAULTS.server.max_body_bytes + b"}"
    headers = {**deployment.headers, "Content-Type": "application/json"}
    async with (
        ClientSession() as http,
        http.post(f"{deployment.origin}/api/login", data=body, headers=headers) as answer,
    ):
        assert answer.status == 413
        assert (await answer.json())["error"]["code"] == "payload_too_large"


async def test_the_proxys_logs_hold_no_token_ticket_path_query_or_address(
    launch: Launch, make_harness: Callable[[], Awaitable[Harness]]
) -> None:
    deployment = await launch()
    app = await make_harness()
    setup = await new_consult(app)
    token, cookie = setup.invite_token, session_cookie(app)
    made_up_ticket = secrets.token_urlsafe(32)
    headers = {**deployment.headers, "X-Forwarded-For": BROWSER}
    async with ClientSession() as http:
        base = deployment.origin
        assert await get_status(http, f"{base}/join/{token}", headers=headers) == 200
        assert await get_status(http, f"{base}/api/invites/{token}", headers=headers) == 200
        async with http.post(
            f"{base}/api/invites/{token}/ticket", json={"consent": True}, headers=headers
        ) as answer:
            assert answer.status == 200, await answer.text()
            ticket = (await answer.json())["ticket"]
        # The upgrade request reaches a node, which refuses it with its JSON.
        status, refusal = await upgrade_refusal(
            http, f"{base}/ws?ticket={made_up_ticket}", deployment.origin
        )
        assert (status, refusal["error"]["code"]) == (401, "ticket_invalid")
        # With a node gone, nginx has errors to log about these requests.
        deployment.nodes[1].kill()
        for _ in range(4):
            status, _refusal = await upgrade_refusal(
                http, f"{base}/ws?ticket={made_up_ticket}", deployment.origin
            )
            assert status == 401
            assert await get_status(http, f"{base}/join/{token}", headers=headers) == 200

    access_log = deployment.proxy.access_log(lines=4 + 4 * 2)
    assert len(access_log) == 4 + 4 * 2, access_log
    logged = "\n".join(access_log) + "\n" + deployment.proxy.error_log()
    for secret_or_personal in (
        token,
        ticket,
        made_up_ticket,
        cookie,
        setup.consult_id,
        BROWSER,
        "ticket",
        "?",
        "/join",
        "/api/",
        "/ws",
    ):
        assert secret_or_personal not in logged
