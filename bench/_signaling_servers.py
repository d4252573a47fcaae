"""The servers under load: ours (one node or two, with or without Redis) and PeerJS."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pyotp
from _common import (
    BENCH,
    HOST,
    ROOT,
)
from _signaling_processes import PROCESSES, free_port, pg_admin, redis_delete_prefix, wait_http
from _signaling_wire import Codec, OursCodec, Pair, PeerJSCodec

VIDEOCONSULT = Path(sys.executable).parent / "videoconsult"
PEERJS_SCRIPT = BENCH / "peerjs_server.cjs"
# Our data dirs go on tmpfs where there is one: only the setup writes there.
SHM_DIR = "/dev/shm" if Path("/dev/shm").is_dir() else None  # noqa: S108 - mkdtemp inside
PASSWORD = "bench password, long enough"  # noqa: S105 - a throwaway account
EMAIL = "bench-therapist@praktijk.example"
ORG = "Bench Praktijk"


# --------------------------------------------------------------------------
# The servers.
# --------------------------------------------------------------------------


class Server:
    name: str
    codec: Codec
    proc: subprocess.Popen[bytes]
    origin: str
    topology = "single"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir

    @property
    def label(self) -> str:
        """The configuration's name in the tables: the server, and its topology if not one node."""
        return self.name if self.topology == "single" else f"{self.name} {self.topology}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        """Every server process (node) of this configuration."""
        return [self.proc.pid]

    async def start(self) -> None:
        raise NotImplementedError

    async def prepare(self, session: aiohttp.ClientSession, n_pairs: int, concurrency: int) -> Any:
        """Whatever must exist before sockets open (ours: the consults)."""
        return None

    async def open_pairs(
        self,
        session: aiohttp.ClientSession,
        prepared: Any,
        n_pairs: int,
        concurrency: int,
        on_pair: Callable[[Pair], None],
    ) -> list[Pair]:
        raise NotImplementedError

    def stop(self) -> None:
        if getattr(self, "proc", None) is not None:
            PROCESSES.stop(self.proc)

    async def cleanup(self) -> None:
        self.stop()

    def describe(self) -> dict[str, Any]:
        return {}


# Our topologies: how many nodes, whether on Redis, and on which node each
# pair's therapist and patient connect (by the pair's index).
@dataclass(frozen=True)
class Topology:
    nodes: int
    redis: bool
    place: Callable[[int], tuple[int, int]]
    about: str


TOPOLOGIES: dict[str, Topology] = {
    "single": Topology(1, False, lambda i: (0, 0), "one node, no Redis (rooms in the process)"),
    "single-redis": Topology(1, True, lambda i: (0, 0), "one node on Redis"),
    "cross": Topology(
        2, True, lambda i: (0, 1), "two nodes on Redis; every therapist on A, every patient on B"
    ),
    "two-nodes": Topology(
        2,
        True,
        lambda i: (i % 2, i % 2),
        "two nodes on Redis; both participants of a pair on the same node, pairs split half/half",
    ),
}


@dataclass
class OursNode:
    """One ``videoconsult serve`` process of a configuration."""

    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def origin(self) -> str:
        return f"http://{HOST}:{self.port}"


class OursServer(Server):
    name = "ours"
    codec = OursCodec()

    def __init__(
        self,
        log_dir: Path,
        *,
        rate_per_s: float,
        burst: int,
        source: Path | None = None,
        revision: str = "working tree",
        db: str = "postgres",
        pg: str = "",
        topology: str = "single",
        redis_url: str = "",
        settings: dict[str, str] | None = None,
    ) -> None:
        """``settings``: more of the server's settings, by environment variable."""
        super().__init__(log_dir)
        self.topology = topology
        self.layout = TOPOLOGIES[topology]
        if self.layout.nodes > 1 and db != "postgres":
            raise ValueError(f"topology {topology} needs --db postgres (the nodes share it)")
        self.db = db
        self.pg = pg
        self.pg_db = ""
        self.redis_url = redis_url if self.layout.redis else ""
        # Our own key prefix per run: every key and channel of the run starts
        # with it, and cleanup() deletes exactly those keys.
        self.redis_prefix = f"vc-bench-{secrets.token_hex(6)}" if self.redis_url else ""
        self.source = source or ROOT
        self.revision = revision
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.data_dir: Path | None = None
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIDEOCONSULT_")}
        # One master key for all nodes: a session or ticket made on one is good on the others.
        key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        env.update(
            VIDEOCONSULT_MODE="production",
            VIDEOCONSULT_SECURITY_MASTER_KEY=key,
            VIDEOCONSULT_SERVER_HOST=HOST,
            VIDEOCONSULT_LOGGING_LEVEL="warning",
            VIDEOCONSULT_SIGNALING_RATE_PER_S=str(rate_per_s),
            VIDEOCONSULT_SIGNALING_BURST=str(burst),
        )
        if self.redis_url:
            env.update(
                VIDEOCONSULT_REDIS_URL=self.redis_url,
                VIDEOCONSULT_REDIS_KEY_PREFIX=self.redis_prefix,
            )
        # A snapshot of one commit, or this checkout: its packages come before
        # the editable install, which may point at another checkout (a git
        # worktree sharing the virtual environment).
        env["PYTHONPATH"] = str(source or ROOT)
        defaults = ((source or ROOT) / "config" / "defaults.toml").read_text()
        if "client_requests_per_min" in defaults:
            # Every socket of the load comes from 127.0.0.1: no per-client limit
            # (commits before it know no such setting, and refuse unknown ones).
            env["VIDEOCONSULT_SECURITY_CLIENT_REQUESTS_PER_MIN"] = "0"
        env.update(settings or {})
        self.nodes: list[OursNode] = []
        for _ in range(self.layout.nodes):
            port = free_port()
            node_env = dict(env)
            node_env.update(
                VIDEOCONSULT_SERVER_PORT=str(port),
                VIDEOCONSULT_SERVER_PUBLIC_URL=f"http://{HOST}:{port}",
            )
            self.nodes.append(OursNode(port, node_env))
        # Accounts and consults are made through the first node.
        self.env = self.nodes[0].env
        self.port = self.nodes[0].port
        self.origin = self.nodes[0].origin
        self.cookie = ""
        self.enrol_token = ""
        # Runs after the CLI's setup, before the nodes start (the background runs' data).
        self.before_serve: Callable[[OursServer], Awaitable[None]] | None = None

    @property
    def pid(self) -> int:
        proc = self.nodes[0].proc
        assert proc is not None
        return proc.pid

    @property
    def pids(self) -> list[int]:
        return [node.proc.pid for node in self.nodes if node.proc is not None]

    def _cli(self, *args: str) -> str:
        done = subprocess.run(  # noqa: S603 - our own command
            [str(VIDEOCONSULT), *args],
            env=self.env,
            cwd=self.source,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"videoconsult {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    async def add_user(self, role: str, email: str) -> str:
        """A new account of the organisation (``videoconsult user add``): its enrolment token."""
        out = await asyncio.to_thread(
            self._cli, "user", "add", "--org", ORG, "--role", role, "--email", email
        )
        found = re.search(r"/enrol/([A-Za-z0-9_-]{20,100})", out)
        if found is None:
            raise RuntimeError(f"no enrolment link in: {out!r}")
        return found.group(1)

    async def start(self) -> None:
        # A fresh data dir per run, on tmpfs: only the setup writes to the
        # database (sessions, consults, connect notes), never the relay. The
        # nodes share it (and the master key), as tests/test_multinode.py does.
        base = SHM_DIR
        self.data_dir = Path(tempfile.mkdtemp(prefix="vc-bench-", dir=base))
        extra = {"VIDEOCONSULT_DATA_DIR": str(self.data_dir)}
        if self.db == "postgres":
            self.pg_db = f"vc_bench_{secrets.token_hex(6)}"
            await pg_admin(self.pg, f'CREATE DATABASE "{self.pg_db}"')
            extra["VIDEOCONSULT_DATABASE_URL"] = f"postgresql+asyncpg://{self.pg}/{self.pg_db}"
        for node in self.nodes:
            node.env.update(extra)
        await asyncio.to_thread(self._cli, "db", "upgrade")
        await asyncio.to_thread(self._cli, "org", "add", ORG)
        self.enrol_token = await self.add_user("therapist", EMAIL)
        if self.before_serve is not None:
            await self.before_serve(self)
        for k, node in enumerate(self.nodes):
            log = "ours-server.log" if len(self.nodes) == 1 else f"ours-server-{'ab'[k]}.log"
            node.proc = PROCESSES.start(
                [str(VIDEOCONSULT), "serve"], env=node.env, log=self.log_dir / log
            )
        for node in self.nodes:
            assert node.proc is not None
            # /readyz: on Redis, 200 only once the node reaches it.
            await wait_http(f"{node.origin}/{'readyz' if self.redis_url else 'healthz'}", node.proc)

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                PROCESSES.stop(node.proc)
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    async def cleanup(self) -> None:
        """Stop the nodes, then drop the run's database and delete its Redis keys;
        every step runs even when one fails."""
        self.stop()
        if self.pg_db:
            name, self.pg_db = self.pg_db, ""
            try:
                await pg_admin(self.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as err:
                print(f"bench: could not drop database {name}: {err!r}", file=sys.stderr)
        if self.redis_prefix:
            prefix, self.redis_prefix = self.redis_prefix, ""
            try:
                await redis_delete_prefix(self.redis_url, prefix)
            except Exception as err:
                print(f"bench: could not delete Redis keys {prefix}:*: {err!r}", file=sys.stderr)

    def describe(self) -> dict[str, Any]:
        return {
            "code": self.revision,
            "topology": f"{self.topology}: {self.layout.about}",
            "database": (
                f"PostgreSQL, a fresh database per run at {self.pg}"
                if self.db == "postgres"
                else "SQLite (the default) in a fresh data dir on tmpfs"
            ),
            "redis": (
                f"{self.redis_url}, a key prefix of its own per run" if self.redis_url else "none"
            ),
            "mode": "production, logging.level=warning",
            "signaling.rate_per_s": self.rate_per_s,
            "signaling.burst": self.burst,
        }

    @staticmethod
    def _headers_for(node: OursNode) -> dict[str, str]:
        return {"Origin": node.origin}

    @property
    def _headers(self) -> dict[str, str]:
        return self._headers_for(self.nodes[0])

    async def _post(
        self,
        session: aiohttp.ClientSession,
        path: str,
        body: Any,
        *,
        auth: bool = False,
        node: OursNode | None = None,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        node = node or self.nodes[0]
        headers = self._headers_for(node)
        if auth:
            headers["Cookie"] = self.cookie
        async with session.post(node.origin + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None), resp

    async def login(self, session: aiohttp.ClientSession) -> None:
        """Enrol the therapist and log in: ``self.cookie`` is the session's cookie."""
        self.cookie = await self.enrol(session, self.enrol_token, EMAIL)

    async def enrol(self, session: aiohttp.ClientSession, token: str, email: str) -> str:
        """Enrol an account through the API (as tests/support/harness.py does),
        then log in once: the session's cookie."""
        status, body, _ = await self._post(
            session, f"/api/enrolment/{token}/password", {"password": PASSWORD}
        )
        if status != 200:
            raise RuntimeError(f"enrolment password: {status} {body}")
        totp = pyotp.TOTP(body["totp_secret"])
        status, body, _ = await self._post(
            session, f"/api/enrolment/{token}/confirm", {"code": totp.now()}
        )
        if status != 200:
            raise RuntimeError(f"enrolment confirm: {status} {body}")
        # The confirming code is used up: log in with the next step's (drift allows it).
        login = {"email": email, "password": PASSWORD, "code": totp.at(time.time() + 30)}
        status, body, resp = await self._post(session, "/api/login", login)
        if status != 200:
            raise RuntimeError(f"login: {status} {body}")
        morsel = next(iter(resp.cookies.values()))
        return f"{morsel.key}={morsel.value}"

    async def create_consult(self, session: aiohttp.ClientSession) -> tuple[str, str]:
        """A new consult of the logged-in therapist: (its id, its invite token)."""
        status, body, _ = await self._post(session, "/api/consults", {}, auth=True)
        if status != 201:
            raise RuntimeError(f"create consult: {status} {body}")
        return body["consult"]["id"], body["invite_token"]

    async def open_therapist(
        self, session: aiohttp.ClientSession, consult_id: str, node: OursNode | None = None
    ) -> aiohttp.ClientWebSocketResponse:
        """The therapist's socket of a consult (its ``welcome`` not yet read)."""
        node = node or self.nodes[0]
        return await session.ws_connect(
            f"ws://{HOST}:{node.port}/ws?consult={consult_id}",
            headers={**self._headers_for(node), "Cookie": self.cookie},
        )

    async def open_patient(
        self, session: aiohttp.ClientSession, invite: str, node: OursNode | None = None
    ) -> aiohttp.ClientWebSocketResponse:
        """A ticket for the invite, then the patient's socket with it (``welcome`` not yet read).

        The ticket comes from the node the socket goes to, as the patient's
        page would get it through the same proxy.
        """
        node = node or self.nodes[0]
        status, body, _ = await self._post(
            session, f"/api/invites/{invite}/ticket", {"consent": True}, node=node
        )
        if status != 200:
            raise RuntimeError(f"ticket: {status} {body}")
        return await session.ws_connect(
            f"ws://{HOST}:{node.port}/ws?ticket={body['ticket']}",
            headers=self._headers_for(node),
        )

    async def prepare(self, session: aiohttp.ClientSession, n_pairs: int, concurrency: int) -> Any:
        await self.login(session)
        gate = asyncio.Semaphore(concurrency)

        async def create(_i: int) -> tuple[str, str]:
            async with gate:
                return await self.create_consult(session)

        return await asyncio.gather(*(create(i) for i in range(n_pairs)))

    async def open_pairs(
        self,
        session: aiohttp.ClientSession,
        prepared: Any,
        n_pairs: int,
        concurrency: int,
        on_pair: Callable[[Pair], None],
    ) -> list[Pair]:
        gate = asyncio.Semaphore(concurrency)

        async def expect(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
            message: dict[str, Any] = await ws.receive_json(timeout=60)
            if message.get("type") != kind:
                raise RuntimeError(f"expected {kind}, got {message}")
            return message

        async def one(index: int, consult_id: str, invite: str) -> Pair:
            therapist_at, patient_at = (self.nodes[k] for k in self.layout.place(index))
            async with gate:
                therapist = await self.open_therapist(session, consult_id, therapist_at)
                await expect(therapist, "welcome")
                patient = await self.open_patient(session, invite, patient_at)
                await expect(patient, "welcome")
                await expect(therapist, "patient-waiting")
                await therapist.send_str('{"v":1,"type":"admit"}')
                await expect(therapist, "peer-joined")
                await expect(patient, "admitted")
            pair = Pair(index, [therapist, patient])
            on_pair(pair)  # read at once: an unread socket does not answer pings
            return pair

        return await asyncio.gather(
            *(one(i, cid, inv) for i, (cid, inv) in enumerate(prepared[:n_pairs]))
        )


class PeerJSServer(Server):
    name = "peerjs"
    codec = PeerJSCodec()

    async def start(self) -> None:
        self.port = free_port()
        self.origin = f"http://{HOST}:{self.port}"
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not installed")
        if not (BENCH / "node_modules" / "peer").is_dir():
            raise RuntimeError("the PeerJS server is not installed: run `npm ci` in bench/")
        self.proc = PROCESSES.start(
            [node, str(PEERJS_SCRIPT), str(self.port)],
            env=dict(os.environ),
            log=self.log_dir / "peerjs-server.log",
        )
        await wait_http(f"{self.origin}/", self.proc)

    def describe(self) -> dict[str, Any]:
        version = json.loads((BENCH / "node_modules/peer/package.json").read_text())["version"]
        node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)  # noqa: S607
        return {"peer": version, "node": node.stdout.strip()}

    async def open_pairs(
        self,
        session: aiohttp.ClientSession,
        prepared: Any,
        n_pairs: int,
        concurrency: int,
        on_pair: Callable[[Pair], None],
    ) -> list[Pair]:
        gate = asyncio.Semaphore(concurrency)
        tag = secrets.token_hex(3)

        async def connect(peer_id: str) -> aiohttp.ClientWebSocketResponse:
            ws = await session.ws_connect(
                f"ws://{HOST}:{self.port}/peerjs?key=peerjs&id={peer_id}"
                f"&token={secrets.token_hex(8)}"
            )
            message = await ws.receive_json(timeout=60)
            if message.get("type") != "OPEN":
                raise RuntimeError(f"expected OPEN, got {message}")
            return ws

        async def one(index: int) -> Pair:
            ids = (f"t{index}-{tag}", f"p{index}-{tag}")
            async with gate:
                first = await connect(ids[0])
                second = await connect(ids[1])
            pair = Pair(index, [first, second], ids)
            on_pair(pair)  # read at once: an unread socket does not answer pings
            return pair

        return await asyncio.gather(*(one(i) for i in range(n_pairs)))
