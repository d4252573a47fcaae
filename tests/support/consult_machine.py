"""A hypothesis state machine over the consult life cycle, with a model of what the server says.

Each example is a server of its own (the real app on SQLite, with the
in-process broker or the real Redis), two consults of two therapists, and
clients that connect, get admitted or denied, relay, drop, come back within
the grace period or after it, open the link on a second device, say bye,
end, ask to record, consent and refuse, and send random and malformed
frames in between (:mod:`tests.support.frames`). The clock is a manual one:
grace periods and the maximum duration run out when a rule moves it.

The model (:class:`ConsultModel`, the :class:`Client` sockets) says, from
docs/protocol.md, what every socket must receive after each step: every
message, in order, and the close code of every socket the server closes.
After each step every open socket sends a ``ping`` and is read to its
``pong`` (or its close), and the received messages must be the predicted
ones: nothing more (so nothing from the other consult), nothing less. Types
the model does not predict are allowed only in :data:`UNPREDICTED`. Then the
consult records must hold exactly their columns, with the predicted values:
the start set once and never moved, the end set once, the duration the
difference.

Hypothesis state machines are synchronous: each example runs its server and
its clients on an event loop of its own, and each step runs there to the end.

Settings that differ from the defaults, so that the model can predict:
messages are never throttled (the rate limit counts real time), ten refused
messages in a row close a socket (reached by the fuzz), one recording at a
time (two consults compete for it), a login session outlives the example's
clock, and the recorder's start time-out (real time) is far beyond an
example. Recording runs up to ``starting``: no media (no recorder offer here
is a usable SDP).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import secrets
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import aiohttp
import redis.asyncio as aioredis
import sqlalchemy as sa
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from audit.accounts import Role
from audit.clock import ManualClock
from audit.db import SQLITE_FILE_NAME
from audit.receipts import receipt_key
from audit.schema import consults
from config import load_settings
from server import create_app
from server.app_keys import ROOMS
from server.resources import ROOM_TIMER_POLL
from signaling.protocol import ParticipantRole
from signaling.state import Participant
from tests.support.databases import copy_sqlite_template
from tests.support.frames import (
    FRAMES,
    MAX_FRAME_BYTES,
    MISBEHAVIOUR,
    PATIENT_ONLY,
    RELAYED,
    THERAPIST_ONLY,
    Refused,
    classify,
    placed,
)
from tests.support.harness import Harness
from tests.support.settings import CHEAP_PASSWORD_HASHING

T = TypeVar("T")

THERAPIST, PATIENT = "therapist", "patient"
ROLES = (THERAPIST, PATIENT)
OTHER_ROLE = {THERAPIST: PATIENT, PATIENT: THERAPIST}
GRACE_S = 30
HEARTBEAT_S = 20.0
MAX_DURATION_S = 3 * 3600
MAX_REFUSED = 10
# The clock of an example moves at most this far: login sessions (24 hours
# idle here) and invites (24 hours) stay good.
CLOCK_SPAN = timedelta(hours=20)
START = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
# What the consult record holds (protocol.md, "What is kept": the start, the
# end and the duration; the API's id, therapist, creation and status), and
# nothing more: no address, no name, nothing of the signaling.
COLUMNS = frozenset(
    {
        "id",
        "therapist_id",
        "created_at",
        "started_at",
        "ended_at",
        "duration_s",
        "status",
        # the appointment, when one was given (a time is not personal data; issue 21)
        "scheduled_at",
    }
)
# Server messages the model does not predict, allowed on these sockets only,
# with these fields: the therapist's socket opening or closing, told to a
# patient in the waiting room.
UNPREDICTED: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {
    "peer-presence": (
        PATIENT,
        lambda message: (
            set(message) == {"v", "type", "role", "present"}
            and message["role"] == THERAPIST
            and isinstance(message["present"], bool)
        ),
    ),
}
# Actions in the therapist's app per example: they take HTTP round trips
# and database writes, and the fuzz is about the sockets.
IN_THE_APP = 3
# How long any one wait for the server may take (a read, a close seen).
WAIT_S = 10.0
# How long a whole step (or the start or end of an example) may take.
STEP_S = 120.0


def fuzz_environ(data_dir: Path, master_key: str) -> dict[str, str]:
    """The settings of the fuzzed server (see the module docstring)."""
    return {
        "VIDEOCONSULT_DATA_DIR": str(data_dir),
        "VIDEOCONSULT_SECURITY_MASTER_KEY": master_key,
        **CHEAP_PASSWORD_HASHING,
        "VIDEOCONSULT_SECURITY_CLIENT_REQUESTS_PER_MIN": "0",
        "VIDEOCONSULT_SIGNALING_RATE_PER_S": "10000",
        "VIDEOCONSULT_SIGNALING_BURST": "100000",
        "VIDEOCONSULT_SIGNALING_MAX_REFUSED": str(MAX_REFUSED),
        "VIDEOCONSULT_SIGNALING_HEARTBEAT_S": str(HEARTBEAT_S),
        "VIDEOCONSULT_CONSULTS_GRACE_S": str(GRACE_S),
        "VIDEOCONSULT_CONSULTS_MAX_DURATION_S": str(MAX_DURATION_S),
        "VIDEOCONSULT_SESSIONS_IDLE_TIMEOUT_S": "86400",
        "VIDEOCONSULT_SESSIONS_ABSOLUTE_TIMEOUT_S": str(7 * 86400),
        "VIDEOCONSULT_RECORDING_MAX_CONCURRENT": "1",
        "VIDEOCONSULT_RECORDING_START_TIMEOUT_S": "120",
        "VIDEOCONSULT_LOGGING_LEVEL": "error",
    }


@dataclass
class FuzzStats:
    """What the fuzz did, over all examples of a run."""

    examples: int = 0
    steps: int = 0
    frames: int = 0  # every WebSocket frame the clients sent
    random_frames: int = 0  # of which random or malformed (FRAMES, oversized)
    sync_frames: int = 0  # of which the pings after each step
    messages: int = 0  # server messages received and checked against the model
    rules: Counter[str] = field(default_factory=Counter)
    # How often the rarer turns of the life cycle came up.
    situations: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "steps": self.steps,
            "frames": self.frames,
            "random_frames": self.random_frames,
            "sync_frames": self.sync_frames,
            "messages": self.messages,
            "rules": dict(sorted(self.rules.items())),
            "situations": dict(sorted(self.situations.items())),
            "seconds": round(self.seconds, 1),
        }


@dataclass(frozen=True)
class Therapist:
    email: str
    account_id: uuid.UUID
    cookie: str


@dataclass
class FuzzWorld:
    """What every example starts from: a data directory with two therapists
    enrolled and logged in (copied for each example), and the backend."""

    warm: Path
    scratch: Path
    therapists: tuple[Therapist, Therapist]
    master_key: str
    redis_url: str | None
    stats: FuzzStats = field(default_factory=FuzzStats)
    numbers: itertools.count[int] = field(default_factory=itertools.count)


def run_on_a_new_loop(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(make())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def prepare_world(template: Path, scratch: Path, redis_url: str | None) -> FuzzWorld:
    """Enrol and log in the two therapists once; the examples copy the result."""
    warm = scratch / "warm"
    copy_sqlite_template(template, warm)
    master_key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    clock = ManualClock(START - timedelta(minutes=10))

    async def enrol() -> tuple[Therapist, Therapist]:
        app = create_app(load_settings(fuzz_environ(warm, master_key)), clock=clock)
        app[ROOM_TIMER_POLL] = 3600.0
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        try:
            harness = Harness(app, client, clock)
            therapists = []
            for number in (1, 2):
                who = await harness.professional(
                    f"fuzz{number}@praktijk-noord.example", Role.THERAPIST
                )
                client.session.cookie_jar.clear()
                response = await harness.login(who)
                assert response.status == 200, await response.text()
                therapists.append(
                    Therapist(who.email, who.account_id, response.cookies["vc_session"].value)
                )
                clock.advance(30)
        finally:
            await client.close()
        return therapists[0], therapists[1]

    therapists = run_on_a_new_loop(enrol)
    assert clock.now() < START
    return FuzzWorld(warm, scratch, therapists, master_key, redis_url)


# What a message may hold where the model cannot know the value.
class Matcher:
    def matches(self, value: Any) -> bool:
        raise NotImplementedError


class Text(Matcher):
    """Any non-empty string (an error's message, a connection id)."""

    def __init__(self, then: Callable[[str], None] | None = None) -> None:
        self._then = then

    def matches(self, value: Any) -> bool:
        if not isinstance(value, str) or not value:
            return False
        if self._then is not None:
            self._then(value)
        return True

    def __repr__(self) -> str:
        return "<text>"


class Same(Matcher):
    """A value the server makes up once (a recording request's id): any
    string the first time, the same one after that."""

    def __init__(self, box: dict[str, str], key: str) -> None:
        self._box, self._key = box, key

    def matches(self, value: Any) -> bool:
        if not isinstance(value, str) or not 1 <= len(value) <= 32:
            return False
        return self._box.setdefault(self._key, value) == value

    def __repr__(self) -> str:
        return f"<same {self._key}>"


def matches(expected: Any, got: Any) -> bool:
    if isinstance(expected, Matcher):
        return expected.matches(got)
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and set(expected) == set(got)
            and all(matches(expected[key], got[key]) for key in expected)
        )
    if isinstance(expected, list):
        return (
            isinstance(got, list)
            and len(expected) == len(got)
            and all(matches(a, b) for a, b in zip(expected, got, strict=True))
        )
    # true is not 1, 1.0 is not 1: JSON's types count.
    return type(expected) is type(got) and expected == got


def message(kind: str, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "type": kind, **fields}


PONG = message("pong")


def error(code: str, ref: str | None) -> dict[str, Any]:
    refused = message("error", code=code, message=Text())
    if ref is not None:
        refused["ref"] = ref
    return refused


@dataclass(eq=False)
class Client:
    """One socket, as the model sees it."""

    name: str
    consult: ConsultModel
    role: str
    ws: aiohttp.ClientWebSocketResponse
    connection: str = ""
    # What the socket must receive next, in order.
    expected: list[Any] = field(default_factory=list)
    # The close code the server sends once the expected messages are out.
    closing: int | None = None
    # Refusals of misbehaviour in a row (signaling.max_refused closes).
    refused: int = 0
    open: bool = True

    def __repr__(self) -> str:
        return self.name

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.name)  # hypothesis prints the steps with it


@dataclass(eq=False)
class Presence:
    client: Client
    connected: bool = True
    # While reconnecting: when its grace period runs out.
    grace_until: datetime | None = None


@dataclass(eq=False)
class ConsultModel:
    index: int
    id: str
    therapist: Therapist
    created_at: datetime
    display_name: str | None
    guardian: bool
    tokens: list[str]
    # The link that works (the newest, unless revoked); None once revoked.
    live_token: str | None
    phase: str = "waiting"  # waiting, active, over
    started_at: datetime | None = None
    ended_at: datetime | None = None
    presence: dict[str, Presence | None] = field(default_factory=lambda: dict.fromkeys(ROLES, None))
    # When each participant went (a drop, a bye): the end of a consult both
    # left is the moment the last one went.
    gone_at: dict[str, datetime | None] = field(default_factory=lambda: dict.fromkeys(ROLES, None))
    recording: str = "off"  # off, requested, starting
    # The open recording request's id, once the server said it.
    request: dict[str, str] = field(default_factory=dict)
    # What the records said so far: the start and end never change once set.
    seen_started: datetime | None = None
    seen_ended: datetime | None = None
    relays: itertools.count[int] = field(default_factory=itertools.count)

    def present(self, role: str) -> bool:
        presence = self.presence[role]
        return presence is not None and presence.connected

    @property
    def max_until(self) -> datetime | None:
        if self.phase != "active" or self.started_at is None:
            return None
        return self.started_at + timedelta(seconds=MAX_DURATION_S)

    def row(self) -> dict[str, Any]:
        """The consult's record as protocol.md ("What is kept") and the API promise it."""
        duration = None
        if self.phase != "over":
            status = "active" if self.started_at is not None else "created"
        elif self.started_at is not None:
            status = "ended"
            assert self.ended_at is not None
            duration = max(0, round((self.ended_at - self.started_at).total_seconds()))
        else:
            status = "not_started"
        return {
            "id": uuid.UUID(self.id),
            "therapist_id": self.therapist.account_id,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": duration,
            "status": status,
            # The machine's consults are made without an appointment.
            "scheduled_at": None,
        }


CONSULT = st.integers(0, 1)
OPENING = st.sampled_from(["empty", "therapist", "patient", "waiting", "running", "running"])
# The therapist's note for the waiting room (no control characters: refused).
DISPLAY_NAME = st.none() | st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=80
)
# Whether a message names its consult: mostly not, sometimes its own, the
# other one, or null.
NAMING = st.sampled_from([None, None, None, "own", "other", "null"])
SDP = st.one_of(
    st.just("v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\n"),
    st.text(min_size=1, max_size=60),
    st.sampled_from([32 * 1024, 32 * 1024 + 1]).map(lambda size: "a" * size),
    st.just(""),
)
CANDIDATE = st.fixed_dictionaries(
    {
        "candidate": st.sampled_from(
            ["", "candidate:842163049 1 udp 1677729535 192.0.2.7 54400 typ srflx", "x" * 1025]
        )
        | st.text(max_size=40),
    },
    optional={
        "sdpMid": st.none() | st.sampled_from(["0", "1", "m" * 65]),
        "sdpMLineIndex": st.none() | st.integers(-1, 65),
    },
)
DETAIL = st.dictionaries(
    st.text(max_size=41),
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=201),
    max_size=21,
)


def _sends(machine: ConsultLifeCycle) -> bool:
    return bool(machine.open_clients())


class ConsultLifeCycle(RuleBasedStateMachine):
    """See the module docstring. The test sets ``world`` (a subclass per test)."""

    world: ClassVar[FuzzWorld]

    def __init__(self) -> None:
        super().__init__()
        self.stats = self.world.stats
        self.stats.examples += 1
        self.loop = asyncio.new_event_loop()
        self.consults: list[ConsultModel] = []
        # Consults over and replaced by a next one (next_consult).
        self.past: list[ConsultModel] = []
        self.clients: list[Client] = []
        # The sockets that sent frames in this step.
        self.actors: list[Client] = []
        self.in_the_app = 0
        self.names = itertools.count(1)
        number = next(self.world.numbers)
        self.data_dir = self.world.scratch / f"example-{number}"
        self.prefix = f"vc-fuzz-{secrets.token_hex(6)}"
        self.started_at = time.monotonic()
        self.server: TestServer | None = None
        self.session: aiohttp.ClientSession | None = None
        self.records: sa.Engine | None = None
        try:
            self.run(self._start())
        except BaseException:
            self._close_loop()
            raise

    # -- running ---------------------------------------------------------

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(self._bounded(coroutine))

    async def _bounded(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """A step that hangs fails, with what every task was waiting for."""
        step = asyncio.ensure_future(coroutine)
        done, _pending = await asyncio.wait({step}, timeout=STEP_S)
        if done:
            return step.result()
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.print_stack(limit=12, file=stacks)
        step.cancel()
        with contextlib.suppress(BaseException):
            await step
        raise AssertionError(f"a step took more than {STEP_S:g} s; the tasks:\n{stacks.getvalue()}")

    async def _start(self) -> None:
        shutil.copytree(self.world.warm, self.data_dir)
        environ = fuzz_environ(self.data_dir, self.world.master_key)
        if self.world.redis_url is not None:
            environ["VIDEOCONSULT_REDIS_URL"] = self.world.redis_url
            environ["VIDEOCONSULT_REDIS_KEY_PREFIX"] = self.prefix
        self.settings = load_settings(environ)
        self.clock = ManualClock(START)
        self.app = create_app(self.settings, clock=self.clock)
        # The steps fire due timers themselves, after moving the clock.
        self.app[ROOM_TIMER_POLL] = 3600.0
        self.server = TestServer(self.app)
        await self.server.start_server()
        self.origin = str(self.server.make_url("/")).rstrip("/")
        self.session = aiohttp.ClientSession(
            base_url=self.server.make_url("/"), cookie_jar=aiohttp.DummyCookieJar()
        )
        database = self.data_dir / SQLITE_FILE_NAME
        self.records = sa.create_engine(f"sqlite:///file:{database}?mode=ro&uri=true")

    def teardown(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self._close_loop()
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.stats.seconds += time.monotonic() - self.started_at

    def _close_loop(self) -> None:
        # As asyncio.run: whatever still runs is cancelled and awaited.
        left = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
        for task in left:
            task.cancel()

        async def finished() -> None:
            await asyncio.gather(*left, return_exceptions=True)

        self.loop.run_until_complete(finished())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    async def _stop(self) -> None:
        try:
            for client in self.clients:
                if not client.ws.closed:
                    await client.ws.close()
        finally:
            if self.records is not None:
                self.records.dispose()
            if self.session is not None:
                await self.session.close()
            if self.server is not None:
                await self.server.close()
            if self.world.redis_url is not None:
                redis = aioredis.Redis.from_url(self.world.redis_url)
                try:
                    async for key in redis.scan_iter(match=f"{self.prefix}:*", count=500):
                        await redis.delete(key)
                finally:
                    await redis.aclose()

    @property
    def rooms(self) -> Any:
        return self.app[ROOMS]

    def open_clients(self) -> list[Client]:
        return [client for client in self.clients if client.open and client.closing is None]

    def step(self, name: str) -> None:
        self.stats.steps += 1
        self.stats.rules[name] += 1

    # -- HTTP ------------------------------------------------------------

    async def http(
        self, method: str, path: str, *, cookie: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        assert self.session is not None
        headers = {"Origin": self.origin}
        if cookie is not None:
            headers["Cookie"] = f"vc_session={cookie}"
        async with self.session.request(method, path, json=body, headers=headers) as response:
            answer = None
            if response.content_type == "application/json":
                answer = await response.json()
            return response.status, answer

    # -- the model: what the server sends ---------------------------------

    def deliver(
        self,
        consult: ConsultModel,
        role: str,
        sent: dict[str, Any],
        *,
        close: int | None = None,
        only: Client | None = None,
    ) -> None:
        """To every open socket of the participant (or only to ``only``)."""
        for client in self.open_clients():
            if client.consult is not consult or client.role != role:
                continue
            if only is not None and client is not only:
                continue
            client.expected.append(sent)
            if close is not None:
                client.closing = close

    def announce(self, consult: ConsultModel, sent: dict[str, Any]) -> None:
        for role in ROLES:
            self.deliver(consult, role, sent)

    def reply(self, client: Client, sent: dict[str, Any]) -> None:
        if client.open and client.closing is None:
            client.expected.append(sent)

    def refuse(self, client: Client, code: str, ref: str | None) -> None:
        if code in MISBEHAVIOUR:
            client.refused += 1
            if client.refused >= MAX_REFUSED:
                client.closing = 1008  # without the error; then it is gone
                return
        self.reply(client, error(code, ref))

    def recording_off(self, consult: ConsultModel, reason: str) -> None:
        """A leave, a replacement or the end stops a recording or its request."""
        if consult.recording != "off":
            consult.recording = "off"
            consult.request = {}
            self.announce(consult, message("recording", state="off", reason=reason))

    def live_recordings(self) -> int:
        return sum(consult.recording == "starting" for consult in self.consults)

    def end(self, consult: ConsultModel, reason: str, *, at: datetime | None = None) -> None:
        if consult.phase == "over":
            return
        consult.phase = "over"
        consult.ended_at = at or self.clock.now()
        consult.presence = dict.fromkeys(ROLES, None)
        consult.live_token = None
        consult.tokens.clear()  # deleted with the end: the links are unknown
        self.recording_off(consult, "consult_ended")
        for role in ROLES:
            self.deliver(consult, role, message("consult-ended", reason=reason), close=4004)

    def join(self, consult: ConsultModel, client: Client) -> None:
        role, other = client.role, OTHER_ROLE[client.role]
        previous = consult.presence[role]
        replaced = previous is not None and previous.connected
        if previous is not None and not previous.connected:
            self.stats.situations["back within the grace period"] += 1
        if previous is not None and previous.connected:
            self.deliver(consult, role, message("replaced"), close=4001, only=previous.client)
        consult.presence[role] = Presence(client)
        consult.gone_at[role] = None
        if consult.phase == "waiting" and role == PATIENT:
            self.deliver(
                consult, other, message("patient-waiting", display_name=consult.display_name)
            )
        elif consult.phase == "active" and consult.present(other):
            self.deliver(consult, other, message("peer-rejoined", role=role))

        def learn(connection: str) -> None:
            client.connection = connection

        client.expected.append(
            message(
                "welcome",
                protocol=1,
                role=role,
                consult=consult.id,
                connection=Text(learn),
                state=consult.phase,
                peer_present=consult.present(other),
                ice_servers=[],
                heartbeat_s=HEARTBEAT_S,
                grace_s=GRACE_S,
                recording=consult.recording,
            )
        )
        if role == THERAPIST and consult.phase == "waiting" and consult.present(PATIENT):
            client.expected.append(message("patient-waiting", display_name=consult.display_name))
        if replaced:
            self.recording_off(consult, "participant_left")

    def leave(self, client: Client, *, grace: bool) -> None:
        """A socket went (``grace``), or its participant said ``bye``."""
        consult, role = client.consult, client.role
        other = OTHER_ROLE[role]
        presence = consult.presence[role]
        if consult.phase == "over" or presence is None or presence.client is not client:
            return  # replaced, or gone already
        if not presence.connected and grace:
            return
        now = self.clock.now()
        end_at = None
        if consult.phase == "waiting":
            consult.presence[role] = None
            if role == PATIENT:
                self.deliver(consult, other, message("peer-left", role=role))
        elif grace:
            presence.connected = False
            presence.grace_until = now + timedelta(seconds=GRACE_S)
            consult.gone_at[role] = now
            self.deliver(consult, other, message("peer-reconnecting", role=role, grace_s=GRACE_S))
        else:
            consult.presence[role] = None
            consult.gone_at[role] = now
            self.deliver(consult, other, message("peer-left", role=role))
            if consult.presence[other] is None:
                end_at = self.last_gone(consult)
            elif not consult.present(other):
                self.stats.situations["bye while the other is in their grace period"] += 1
        self.recording_off(consult, "participant_left")
        if end_at is not None:
            self.end(consult, "both_left", at=end_at)

    def last_gone(self, consult: ConsultModel) -> datetime:
        """protocol.md, "Reconnecting": the recorded end of a consult both
        left is the moment the last one went."""
        moments = [moment for moment in consult.gone_at.values() if moment is not None]
        return max(moments) if moments else self.clock.now()

    def grace_over(self, consult: ConsultModel, role: str) -> None:
        presence = consult.presence[role]
        assert presence is not None
        assert not presence.connected
        other = OTHER_ROLE[role]
        consult.presence[role] = None
        self.stats.situations["a grace period ran out"] += 1
        self.deliver(consult, other, message("peer-left", role=role))
        if consult.presence[other] is None:
            last = self.last_gone(consult)
            if last != consult.gone_at[role]:
                self.stats.situations["ended by a grace period, the other gone after"] += 1
            self.end(consult, "both_left", at=last)

    def handle(self, client: Client, frame: str | bytes) -> None:
        """What the server does with one frame from ``client``."""
        if not client.open or client.closing is not None:
            return  # no longer read
        size = len(frame) if isinstance(frame, bytes) else len(frame.encode())
        if size > MAX_FRAME_BYTES:
            client.closing = 1009
            return
        verdict = classify(frame)
        if isinstance(verdict, Refused):
            self.refuse(client, verdict.code, verdict.ref)
            return
        self.act(client, verdict.message)

    def act(self, client: Client, sent: dict[str, Any]) -> None:
        """A well-formed message, in the consult's state ("Messages")."""
        consult, role, kind = client.consult, client.role, sent["type"]
        other = OTHER_ROLE[role]
        if sent.get("consult") is not None and sent["consult"] != consult.id:
            self.refuse(client, "not_in_consult", kind)
            return
        if kind in RELAYED:
            if consult.phase == "over":
                self.refuse(client, "consult_over", kind)
            elif consult.phase != "active":
                self.refuse(client, "not_admitted", kind)
            elif not consult.present(other):
                self.refuse(client, "peer_absent", kind)
            else:
                self.deliver(consult, other, {**sent, "sender": role})
                client.refused = 0
            return
        if kind in THERAPIST_ONLY and role != THERAPIST:
            self.refuse(client, "not_allowed", kind)
            return
        if kind in PATIENT_ONLY and role != PATIENT:
            self.refuse(client, "not_allowed", kind)
            return
        handler = getattr(self, "on_" + kind.replace("-", "_"))
        handler(client, sent)

    def done(self, client: Client, *answers: dict[str, Any]) -> None:
        client.refused = 0
        for answer in answers:
            self.reply(client, answer)

    def on_ping(self, client: Client, sent: dict[str, Any]) -> None:
        self.done(client, PONG)

    def on_report(self, client: Client, sent: dict[str, Any]) -> None:
        self.done(client)  # kept for support, never answered

    def on_admit(self, client: Client, sent: dict[str, Any]) -> None:
        consult = client.consult
        if consult.phase != "waiting" or not consult.present(PATIENT):
            self.refuse(client, "no_patient_waiting", "admit")
            return
        consult.phase = "active"
        if consult.started_at is None:
            consult.started_at = self.clock.now()
        # The key the page asks for the patient's receipt with (protocol.md):
        # made from the server's master key and the consult, as the server does.
        key = receipt_key(base64.urlsafe_b64decode(self.world.master_key), uuid.UUID(consult.id))
        self.deliver(consult, PATIENT, message("admitted", receipt_key=key))
        self.done(client, message("peer-joined", role=PATIENT))

    def on_deny(self, client: Client, sent: dict[str, Any]) -> None:
        consult = client.consult
        if consult.phase != "waiting" or not consult.present(PATIENT):
            self.refuse(client, "no_patient_waiting", "deny")
            return
        consult.presence[PATIENT] = None
        self.deliver(consult, PATIENT, message("denied"), close=4003)
        self.done(client)

    def on_end(self, client: Client, sent: dict[str, Any]) -> None:
        client.refused = 0
        self.end(client.consult, "ended_by_therapist")

    def on_bye(self, client: Client, sent: dict[str, Any]) -> None:
        client.refused = 0
        self.leave(client, grace=False)
        if client.closing is None:
            client.closing = 1000  # left for good: the server closes the socket

    def on_record_request(self, client: Client, sent: dict[str, Any]) -> None:
        consult = client.consult
        if consult.phase == "over":
            self.refuse(client, "consult_over", "record-request")
        elif consult.phase != "active":
            self.refuse(client, "not_admitted", "record-request")
        elif not (consult.present(THERAPIST) and consult.present(PATIENT)):
            self.refuse(client, "peer_absent", "record-request")
        elif consult.recording != "off":
            self.refuse(client, "recording_state", "record-request")
        elif self.live_recordings() >= 1:
            self.refuse(client, "recording_unavailable", "record-request")
        else:
            consult.recording = "requested"
            consult.request = {}  # its id, once the server said it
            self.announce(
                consult,
                message(
                    "recording",
                    state="requested",
                    guardian_required=consult.guardian,
                    request=Same(consult.request, "id"),
                ),
            )
            self.done(client)

    def on_record_consent(self, client: Client, sent: dict[str, Any]) -> None:
        consult = client.consult
        if consult.recording != "requested":
            self.refuse(client, "recording_state", "record-consent")
            return
        asked = sent.get("request")
        if asked is not None and asked != consult.request.get("id"):
            self.refuse(client, "recording_state", "record-consent")
            return
        if not sent["agree"]:
            consult.recording = "off"
            consult.request = {}
            self.announce(consult, message("recording", state="refused"))
            self.done(client)
            return
        if consult.guardian and sent.get("by", "patient") != "guardian":
            self.refuse(client, "guardian_consent_required", "record-consent")
            return
        if self.live_recordings() >= 1:
            consult.recording = "off"
            consult.request = {}
            self.announce(consult, message("recording", state="off", reason="server_busy"))
            self.done(client)
            return
        consult.recording = "starting"
        consult.request = {}
        self.announce(consult, message("recording", state="starting"))
        self.done(client)

    def on_record_stop(self, client: Client, sent: dict[str, Any]) -> None:
        consult = client.consult
        if consult.recording == "off":
            self.refuse(client, "recording_state", "record-stop")
            return
        self.recording_off(consult, f"stopped_by_{client.role}")
        self.done(client)

    def on_recorder_offer(self, client: Client, sent: dict[str, Any]) -> None:
        if client.consult.recording != "starting":
            self.refuse(client, "recording_state", "recorder-offer")
            return
        # No offer made here carries a microphone: the recorder cannot use it.
        self.refuse(client, "invalid_message", "recorder-offer")

    # -- the clients -----------------------------------------------------

    async def send(
        self, client: Client, frame: str | bytes, *, random: bool = False, sync: bool = False
    ) -> None:
        self.stats.frames += 1
        if not sync:
            self.actors.append(client)
        if random:
            self.stats.random_frames += 1
        if isinstance(frame, bytes):
            await client.ws.send_bytes(frame)
        else:
            await client.ws.send_str(frame)
        self.handle(client, frame)

    async def receive(self, client: Client) -> tuple[list[Any], int | None]:
        """What the socket got until its close (and the code), or, for a socket
        the server keeps open, until as many pongs as the model expects."""
        pongs = sum(sent == PONG for sent in client.expected)
        received: list[Any] = []
        while client.closing is not None or pongs:
            frame = await client.ws.receive(timeout=WAIT_S)
            if frame.type is WSMsgType.TEXT:
                parsed = json.loads(frame.data)
                received.append(parsed)
                pongs -= parsed == PONG
                continue
            if frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                code = frame.data if frame.type is WSMsgType.CLOSE else client.ws.close_code
                return received, code
            raise AssertionError(f"{client}: unexpected frame {frame.type!r}: {frame.data!r}")
        return received, None

    def compare(self, client: Client, received: list[Any]) -> None:
        kept = []
        for got in received:
            kind = got.get("type") if isinstance(got, dict) else None
            allowed = UNPREDICTED.get(kind) if isinstance(kind, str) else None
            if allowed is not None and allowed[0] == client.role and allowed[1](got):
                continue
            kept.append(got)
        expected, client.expected = client.expected, []
        self.stats.messages += len(received)
        ok = len(kept) == len(expected) and all(
            matches(want, got) for want, got in zip(expected, kept, strict=False)
        )
        assert ok, (
            f"{client} ({client.role} of consult {client.consult.index}) received\n"
            f"  {kept}\nbut protocol.md says\n  {expected}"
        )

    async def let_go(self, client: Client) -> None:
        """Until the server has handled the socket's close (its leave is done)."""
        participant = Participant(
            uuid.UUID(client.consult.id), ParticipantRole(client.role), client.connection
        )
        deadline = time.monotonic() + WAIT_S
        while self.rooms.is_here(participant):
            assert time.monotonic() < deadline, f"the server never saw {client} go"
            await asyncio.sleep(0.002)
        await self.rooms.drain()

    async def settle(self) -> None:
        """Read every socket to its close or its pong; check what came."""
        for client in list(self.clients):
            if not client.open or client.closing is None:
                continue
            received, code = await self.receive(client)
            self.compare(client, received)
            assert code == client.closing, (
                f"{client} was closed with {code}, but protocol.md says {client.closing}"
            )
            client.open = False
            await client.ws.close()
            await self.let_go(client)
            if code in (1008, 1009):
                self.leave(client, grace=True)  # as any socket that goes
        # Those that sent first: once their frames are handled, all they
        # made the server send to the others is on its way.
        actors, self.actors = self.actors, []
        for client in dict.fromkeys(actors):
            if client.open and client.closing is None:
                await self.sync(client)
        others = [client for client in self.open_clients() if client not in actors]
        await asyncio.gather(*(self.sync(client) for client in others))
        assert not any(client.closing for client in self.open_clients())

    async def sync(self, client: Client) -> None:
        self.stats.sync_frames += 1
        await self.send(client, json.dumps({"v": 1, "type": "ping"}), sync=True)
        received, code = await self.receive(client)
        self.compare(client, received)
        assert code is None, f"{client} was closed with {code}; protocol.md says it stays open"

    def check_records(self) -> None:
        # Read from the file beside the server (a reader does not wait for its writers).
        assert self.records is not None
        with self.records.connect() as conn:
            rows = conn.execute(
                sa.select(consults).where(
                    consults.c.id.in_(
                        [uuid.UUID(consult.id) for consult in self.consults + self.past]
                    )
                )
            ).all()
        found = {str(row.id): dict(row._mapping) for row in rows}
        for consult in self.consults + self.past:
            row = found[consult.id]
            assert set(row) == COLUMNS, f"the record's columns are {sorted(row)}"
            started, ended = row["started_at"], row["ended_at"]
            if consult.seen_started is not None:
                assert started == consult.seen_started, "the consult's start moved"
            if consult.seen_ended is not None:
                assert ended == consult.seen_ended, "the consult ended twice"
            consult.seen_started, consult.seen_ended = started, ended
            if started is not None:
                assert row["created_at"] <= started
            if ended is not None:
                assert started is None or started <= ended
            if row["duration_s"] is not None:
                assert started is not None
                assert ended is not None
                assert row["duration_s"] == round((ended - started).total_seconds())
            assert row == consult.row(), (
                f"consult {consult.index}'s record is\n  {row}\nbut the model says\n"
                f"  {consult.row()}"
            )

    @invariant()
    def every_socket_got_what_protocol_md_says(self) -> None:
        if not self.consults:
            return
        self.run(self.settle())
        for client in self.open_clients():
            # No ghost: a socket still open is its participant's connection.
            presence = client.consult.presence[client.role]
            assert presence is not None
            assert presence.client is client
            assert presence.connected
        self.check_records()
        assert self.rooms.recording.live_count == self.live_recordings()
        if not self.open_clients():
            status, _answer = self.run(self.http("GET", "/healthz"))
            assert status == 200

    # -- the rules -------------------------------------------------------

    @initialize(
        names=st.tuples(DISPLAY_NAME, DISPLAY_NAME),
        guardians=st.tuples(st.booleans(), st.booleans()),
        openings=st.tuples(OPENING, OPENING),
    )
    def two_consults(
        self,
        names: tuple[str | None, str | None],
        guardians: tuple[bool, bool],
        openings: tuple[str, str],
    ) -> None:
        """Two consults of two therapists. Each starts empty, with its
        therapist, with a patient waiting (with or without the therapist), or
        running."""
        self.step("two_consults")
        for index in (0, 1):
            self.consults.append(self.run(self._new_consult(index, names[index], guardians[index])))
        for consult, opening in zip(self.consults, openings, strict=True):
            self.run(self._opening(consult, opening))

    async def _new_consult(self, index: int, name: str | None, guardian: bool) -> ConsultModel:
        therapist = self.world.therapists[index]
        body: dict[str, Any] = {"guardian_consent": guardian}
        if name is not None:
            body["display_name"] = name
        status, answer = await self.http(
            "POST", "/api/consults", cookie=therapist.cookie, body=body
        )
        assert status == 201, answer
        token = answer["invite_token"]
        return ConsultModel(
            index=index,
            id=answer["consult"]["id"],
            therapist=therapist,
            created_at=self.clock.now(),
            display_name=name,
            guardian=guardian,
            tokens=[token],
            live_token=token,
        )

    @precondition(lambda self: any(consult.phase == "over" for consult in self.consults))
    @rule(
        data=st.data(),
        name=DISPLAY_NAME,
        guardian=st.booleans(),
        opening=OPENING,
    )
    def next_consult(
        self, data: st.DataObject, name: str | None, guardian: bool, opening: str
    ) -> None:
        """The therapist of a consult that is over makes the next one; the
        record of the old one must not change any more."""
        self.step("next_consult")
        over = [consult for consult in self.consults if consult.phase == "over"]
        old = data.draw(st.sampled_from(over), label="consult over")
        consult = self.run(self._new_consult(old.index, name, guardian))
        self.past.append(old)
        self.consults[old.index] = consult
        self.run(self._opening(consult, opening))

    def other_consult(self, consult: ConsultModel) -> ConsultModel:
        return self.consults[1 - consult.index]

    def new_client(self, consult: ConsultModel, role: str, ws: Any) -> Client:
        name = f"{role[0].upper()}{consult.index}.{next(self.names)}"
        client = Client(name, consult, role, ws)
        self.clients.append(client)
        return client

    async def _opening(self, consult: ConsultModel, opening: str) -> None:
        if opening in ("therapist", "waiting", "running"):
            await self._therapist_connects(consult)
        if opening in ("patient", "waiting", "running"):
            await self._patient_connects(consult, "live", "both")
        if opening == "running":
            presence = consult.presence[THERAPIST]
            assert presence is not None
            therapist = presence.client
            await self.say(therapist, message("admit"), None)

    @rule(
        index=CONSULT,
        role=st.sampled_from(ROLES),
        link=st.sampled_from(["live", "live", "live", "old"]),
        consent=st.sampled_from(["both", "both", "both", "none", "patient"]),
        again=st.sampled_from([False, False, False, True]),
    )
    def connects(self, index: int, role: str, link: str, consent: str, again: bool) -> None:
        """A socket opens: a therapist's (cookie), a patient's (a ticket from
        the link, the live one or an old one, with or without the consents;
        the ticket used ``again``). Also a second tab or device: the older
        socket is replaced."""
        self.step(f"connects_{role}")
        consult = self.consults[index]
        if role == THERAPIST:
            self.run(self._therapist_connects(consult))
        else:
            self.run(self._patient_connects(consult, link, consent, again=again))

    async def _therapist_connects(self, consult: ConsultModel) -> None:
        assert self.session is not None
        path = f"/ws?consult={consult.id}"
        headers = {"Origin": self.origin, "Cookie": f"vc_session={consult.therapist.cookie}"}
        if consult.phase == "over":
            # Refused before the upgrade, so asked without one: the answer says why.
            status, answer = await self.http("GET", path, cookie=consult.therapist.cookie)
            assert (status, answer["error"]["code"]) == (409, "consult_over"), answer
            return
        ws = await self.session.ws_connect(path, headers=headers)
        await self.joined(consult, self.new_client(consult, THERAPIST, ws))

    async def _patient_connects(
        self, consult: ConsultModel, link: str, consent: str, *, again: bool = False
    ) -> None:
        assert self.session is not None
        if link == "old" or consult.live_token is None:
            older = [token for token in consult.tokens if token != consult.live_token]
            token = older[0] if older else secrets.token_urlsafe(32)
        else:
            token = consult.live_token
        if consult.phase == "over" or token not in consult.tokens:
            expected: tuple[int, str | None] = (404, "invite_unknown")
        elif token != consult.live_token:
            expected = (410, "invite_revoked")
        elif consent == "none":
            expected = (422, "consent_required")
        elif consent == "patient" and consult.guardian:
            expected = (422, "guardian_consent_required")
        else:
            expected = (200, None)
        status, answer = await self.http(
            "POST",
            f"/api/invites/{token}/ticket",
            body={"consent": consent != "none", "guardian_consent": consent == "both"},
        )
        code = answer["error"]["code"] if status != 200 else None
        assert (status, code) == expected, (status, answer)
        if status != 200:
            return
        path = f"/ws?ticket={answer['ticket']}"
        ws = await self.session.ws_connect(path, headers={"Origin": self.origin})
        await self.joined(consult, self.new_client(consult, PATIENT, ws))
        if again:
            # A ticket works once (refused before the upgrade: asked without one).
            status, answer = await self.http("GET", path)
            assert (status, answer["error"]["code"]) == (401, "ticket_invalid"), answer

    async def joined(self, consult: ConsultModel, client: Client) -> None:
        """The server joins a socket after the upgrade; its ``welcome`` comes
        once it has, after what the join sent the others."""
        self.join(consult, client)
        frame = await client.ws.receive(timeout=WAIT_S)
        assert frame.type is WSMsgType.TEXT, f"{client} got {frame.type!r} for its welcome"
        welcome = json.loads(frame.data)
        self.stats.messages += 1
        assert matches(client.expected[0], welcome), (
            f"{client} was welcomed with\n  {welcome}\nbut protocol.md says\n  {client.expected[0]}"
        )
        del client.expected[0]

    @precondition(_sends)
    @rule(data=st.data(), abrupt=st.booleans())
    def drop(self, data: st.DataObject, abrupt: bool) -> None:
        """A socket goes: closed, or cut without a close (a network change)."""
        self.step("drop")
        client = data.draw(st.sampled_from(self.open_clients()), label="socket")
        self.run(self._drop(client, abrupt))

    async def _drop(self, client: Client, abrupt: bool) -> None:
        client.open = False
        if abrupt:
            transport = client.ws._conn.transport if client.ws._conn is not None else None
            if transport is not None:
                transport.abort()
        await client.ws.close()
        await self.let_go(client)
        self.leave(client, grace=True)

    async def say(self, client: Client, sent: dict[str, Any], naming: str | None) -> None:
        if naming is not None:
            consult = client.consult
            named = {"own": consult.id, "other": self.other_consult(consult).id, "null": None}
            sent = {**sent, "consult": named[naming]}
        await self.send(client, json.dumps(sent))

    @precondition(_sends)
    @rule(
        data=st.data(),
        kind=st.sampled_from(
            [
                *("admit", "admit", "deny", "end", "ping"),
                *("record-request", "record-request", "record-stop"),
            ]
        ),
        naming=NAMING,
    )
    def says(self, data: st.DataObject, kind: str, naming: str | None) -> None:
        """admit, deny, end, ping, record-request, record-stop: from either role."""
        self.step(f"says_{kind}")
        client = data.draw(st.sampled_from(self.open_clients()), label="socket")
        self.run(self.say(client, message(kind), naming))

    @precondition(_sends)
    @rule(data=st.data(), naming=NAMING)
    def says_bye(self, data: st.DataObject, naming: str | None) -> None:
        """Leaving for good (no grace period); the server closes the socket."""
        self.step("says_bye")
        client = data.draw(st.sampled_from(self.open_clients()), label="socket")
        self.run(self.say(client, message("bye"), naming))

    @precondition(_sends)
    @rule(
        data=st.data(),
        kind=st.sampled_from(["offer", "answer"]),
        sdp=SDP,
        naming=NAMING,
    )
    def relays_sdp(self, data: st.DataObject, kind: str, sdp: str, naming: str | None) -> None:
        self.step("relays_sdp")
        client = data.draw(st.sampled_from(self.open_clients()), label="socket")
        if 0 < len(sdp) < 100:
            # Whose it is, to tell in a failure.
            sdp = f"{sdp} consult {client.consult.index}.{next(client.consult.relays)}"
        self.run(self.say(client, message(kind, sdp=sdp), naming))

    @precondition(_sends)
    @rule(data=st.data(), fields=CANDIDATE, naming=NAMING)
    def relays_candidate(
        self, data: st.DataObject, fields: dict[str, Any], naming: str | None
    ) -> None:
        self.step("relays_candidate")
        client = data.draw(st.sampled_from(self.open_clients()), label="socket")
        self.run(self.say(client, message("candidate", **fields), naming))

    @precondition(_sends)
    @rule(data=st.data(), count=st.integers(1, 20), naming=NAMING)
    def trickles(self, data: st.DataObject, count: int, naming: str | None) -> None:
        """An offer and its trickle of ICE candidates, as a browser sends them."""
        self.step("trickles")
        client = data.draw(st.sampled_from(self.open_clients()), label="socket")
        self.run(self._trickles(client, count, naming))

    async def _trickles(self, client: Client, count: int, naming: str | None) -> None:
        marker = f"consult {client.consult.index}.{next(client.consult.relays)}"
        await self.say(client, message("offer", sdp=f"v=0\r\ns={marker}\r\n"), naming)
        for number in range(count):
            candidate = (
                f"candidate:{number} 1 udp 2122260223 192.0.2.{number} 5440{number} typ host"
            )
            sent = message("candidate", candidate=candidate, sdpMid="0", sdpMLineIndex=0)
            await self.say(client, sent, naming)

    @precondition(_sends)
    @rule(
        data=st.data(),
        agree=st.booleans(),
        by=st.sampled_from([None, "patient", "guardian"]),
        request=st.sampled_from(["current", "current", None, "null", "earlier"]),
        naming=NAMING,
    )
    def consents(
        self,
        data: st.DataObject,
        agree: bool,
        by: str | None,
        request: str | None,
        naming: str | None,
    ) -> None:
        """record-consent: yes or no, by whom, to which question."""
        self.step("consents")
        client = data.draw(st.sampled_from(self.open_clients()), label="socket")
        sent = message("record-consent", agree=agree)
        if by is not None:
            sent["by"] = by
        if request == "current":
            sent["request"] = client.consult.request.get("id", "unknown-question")
        elif request == "earlier":
            sent["request"] = "an-earlier-one"
        elif request == "null":
            sent["request"] = None
        self.run(self.say(client, sent, naming))

    @precondition(_sends)
    @rule(
        data=st.data(),
        kind=st.sampled_from(["recorder-offer", "report", "big frame"]),
        sdp=st.sampled_from(["v=0\r\n", "not an sdp"]),
        event=st.sampled_from(["ice-state", "call-failed", "stats"]),
        detail=DETAIL,
        size=st.sampled_from([MAX_FRAME_BYTES - 1, MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1]),
    )
    def sends_the_rarer_kinds(
        self,
        data: st.DataObject,
        kind: str,
        sdp: str,
        event: str,
        detail: dict[str, Any],
        size: int,
    ) -> None:
        """An offer to the recorder (no usable SDP: no media here), a report
        for support (never answered), or a ping or an offer at the 64 KiB
        limit or just over it (padded with JSON's blanks)."""
        self.step(kind.replace(" ", "_"))
        client = data.draw(st.sampled_from(self.open_clients()), label="socket")
        if kind == "recorder-offer":
            self.run(self.say(client, message("recorder-offer", sdp=sdp), None))
        elif kind == "report":
            self.run(self.say(client, message("report", event=event, detail=detail), None))
        else:
            text = json.dumps(message("offer", sdp=sdp) if "v=0" in sdp else message("ping"))
            frame = text[:-1] + " " * (size - len(text)) + "}"
            assert len(frame.encode()) == size
            self.stats.random_frames += 1
            self.run(self.send(client, frame))

    @precondition(_sends)
    @rule(data=st.data(), frames=st.lists(FRAMES, min_size=1, max_size=2 * MAX_REFUSED))
    def random_frames(self, data: st.DataObject, frames: list[str | bytes]) -> None:
        """Random and malformed frames in a row (enough to be closed with 1008)."""
        self.step("random_frames")
        client = data.draw(st.sampled_from(self.open_clients()), label="socket")
        own, other = client.consult.id, self.other_consult(client.consult).id
        self.run(self._random_frames(client, [placed(frame, own, other) for frame in frames]))

    async def _random_frames(self, client: Client, frames: list[str | bytes]) -> None:
        for frame in frames:
            await self.send(client, frame, random=True)

    @precondition(
        # With nobody connected or coming back, time passing changes nothing.
        lambda self: (
            self.clock.now() < START + CLOCK_SPAN and bool(self.open_clients() or self.deadlines())
        )
    )
    @rule(seconds=st.integers(0, 2 * GRACE_S + 5) | st.sampled_from([GRACE_S - 1, GRACE_S]))
    def time_passes(self, seconds: int) -> None:
        """The clock moves; grace periods that run out do so in order."""
        self.step("time_passes")
        self.run(self.advance(timedelta(seconds=seconds)))

    @precondition(
        lambda self: (
            self.clock.now() < START + CLOCK_SPAN - timedelta(seconds=MAX_DURATION_S)
            and any(consult.phase == "active" for consult in self.consults)
        )
    )
    @rule(data=st.data())
    def maximum_duration_passes(self, data: st.DataObject) -> None:
        self.step("maximum_duration_passes")
        running = [consult for consult in self.consults if consult.phase == "active"]
        consult = data.draw(st.sampled_from(running), label="consult")
        assert consult.max_until is not None
        self.run(self.advance(consult.max_until - self.clock.now()))

    def deadlines(self) -> list[tuple[datetime, ConsultModel, str]]:
        due = []
        for consult in self.consults:
            if consult.max_until is not None:
                due.append((consult.max_until, consult, "max"))
            for role in ROLES:
                presence = consult.presence[role]
                if presence is not None and presence.grace_until and not presence.connected:
                    due.append((presence.grace_until, consult, role))
        return sorted(due, key=lambda item: (item[0], item[1].index, item[2]))

    async def advance(self, by: timedelta) -> None:
        until = self.clock.now() + by
        while True:
            due = [item for item in self.deadlines() if item[0] <= until]
            if not due:
                break
            moment = due[0][0]
            now_due = [item for item in due if item[0] == moment]
            for consult in self.consults:
                kinds = {kind for _when, which, kind in now_due if which is consult}
                # A grace period and the maximum duration running out at the
                # same instant: the server may take either first.
                if "max" in kinds and len(kinds) > 1:
                    assume(False)
            self.clock.advance((moment - self.clock.now()).total_seconds())
            await self.rooms.fire_due_timers()
            for _when, consult, kind in now_due:
                if kind == "max":
                    self.end(consult, "max_duration")
                elif consult.phase != "over":
                    self.grace_over(consult, kind)
        self.clock.advance((until - self.clock.now()).total_seconds())
        await self.rooms.fire_due_timers()

    def link_revoked(self, consult: ConsultModel) -> None:
        """The link was revoked (or replaced): a waiting patient is sent away."""
        if consult.phase == "waiting" and consult.present(PATIENT):
            consult.presence[PATIENT] = None
            self.deliver(consult, PATIENT, message("denied"), close=4003)
            self.deliver(consult, THERAPIST, message("peer-left", role=PATIENT))

    @precondition(lambda self: self.in_the_app < IN_THE_APP)
    @rule(index=CONSULT, action=st.sampled_from(["new link", "new link", "revoke", "end"]))
    def therapist_in_the_app(self, index: int, action: str) -> None:
        """A new link (the older ones stop working), revoking the link (a
        waiting patient is sent away), or ending the consult in the app."""
        self.step(f"in_the_app_{action.replace(' ', '_')}")
        self.in_the_app += 1
        consult = self.consults[index]
        cookie = consult.therapist.cookie
        path = f"/api/consults/{consult.id}"
        if action == "end":
            status, answer = self.run(self.http("POST", f"{path}/end", cookie=cookie))
            assert status == 200, answer
            self.end(consult, "ended_by_therapist")  # as the end message
            assert answer["consult"]["status"] == consult.row()["status"]
        elif action == "revoke":
            status, answer = self.run(self.http("DELETE", f"{path}/invite", cookie=cookie))
            assert status == 204, answer
            consult.live_token = None
            self.link_revoked(consult)
        else:
            status, answer = self.run(self.http("POST", f"{path}/invite", cookie=cookie))
            if consult.phase == "over":
                assert status == 409, answer
                return
            assert status == 200, answer
            assert answer["guardian_consent"] is consult.guardian
            # The old link is revoked: a patient waiting with it is sent away.
            self.link_revoked(consult)
            consult.tokens.append(answer["invite_token"])
            consult.live_token = answer["invite_token"]
