"""Every operation of docs/openapi.yaml, fuzzed by schemathesis against the
running app, for each role: no 5xx, and every answer's status code, content
type, headers and body are ones the document gives for that operation.

The app is the test harness's (``sqlite_harness``): the real app behind
aiohttp's TestServer on 127.0.0.1, in this test's event loop, with the
harness's accounts, manual clock and stored recordings. schemathesis calls
it over real TCP with ``requests`` from a worker thread
(``asyncio.to_thread``) while the loop serves: every request goes through
aiohttp's own HTTP parser as a client's would (schemathesis's ASGI and WSGI
transports do not fit an aiohttp app), and the test needs no server process
and no set-up besides the one the other API tests use.

One test per tag of the document (admin, consults, support, ...), each on an
app of its own: an organisation with an admin, a therapist and a support
user, each logged in with the harness's helpers and fuzzing with its own
session cookie, and anonymous callers, for whom schemathesis makes up the
cookie. The roles an operation is not for come first, with a few examples
(they are refused before their input is read); the role it is for comes
last, with most. Random ids only ever reach 404, so some of the cases of an
operation with a path parameter use a real id instead (schemathesis's
``as_strategy(path_parameters=...)``): fresh targets for each operation (an
active, an enrolling and a disabled account; a new and a started consult
with their invite links; a complete and an incomplete recording; enrolment
links before and after the password; two receipts of the started consult),
so that what one operation does to them (disabled, erased, ended, deleted)
cannot hide another's answers. The role accounts are never targets, so
their sessions last, and the operations
that can end the calling session (login, logout) come last in their group.
Stateful links would only reach the same ids by a longer way.

The cases: positive ones follow the document's schemas; negative ones break
them (wrong types, missing or unknown fields, bodies that are not JSON);
and naughty ones put one value that a schema's generator seldom makes into
an otherwise valid request: a query parameter (a documented one or one no
operation takes), a path parameter or a field of the JSON body. Digits that
are not ASCII, moments at the end of the calendar and the like (see
NAUGHTY_VALUES): each found a 500 once.

Every request carries the server's own Origin, as the browser app's do:
without it the Origin check answers 403 before anything else, and that
would be all a fuzzer saw. VIDEOCONSULT_TEST_FUZZ_EXAMPLES multiplies the number
of examples for a longer run by hand (``VIDEOCONSULT_TEST_FUZZ_EXAMPLES=10
./scripts/test tests/test_api_fuzz.py``). A failure names the operation and
the role, and gives a curl command (the session cookie filtered out) and
Hypothesis's seed.
"""

from __future__ import annotations

import asyncio
import os
import traceback
import uuid
from pathlib import Path
from typing import Any, TypeAlias

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from audit.accounts import Role, disable_account, find_account_by_email
from audit.consults import mark_started
from audit.schema import webhook_endpoints
from audit.sealing import seal
from audit.technical_log import write_technical
from audit.webhooks import SECRET_PURPOSE
from server.app_keys import DB_ENGINE, MASTER_KEY
from tests.support.harness import Harness, stored_recording

pytestmark = pytest.mark.slow

Operation: TypeAlias = APIOperation[Any, Any, Any, Any]
Cases: TypeAlias = st.SearchStrategy[Case[Any]]

SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
SCHEMA = schemathesis.openapi.from_path(SPEC)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

ANONYMOUS = "anonymous"
ROLES = (Role.ADMIN.value, Role.THERAPIST.value, Role.SUPPORT.value)
# Whose operations these are, by tag. The other tags' (pages, auth,
# enrolment, invites, operations, signaling) are everyone's.
OWNER = {"admin": "admin", "consults": "therapist", "recordings": "therapist", "support": "support"}
# Operations that can end the session they are called with: after the rest.
LAST = ("login", "logout")

SCALE = float(os.environ.get("VIDEOCONSULT_TEST_FUZZ_EXAMPLES", "1"))
OWN_EXAMPLES = 25  # the role the operation is for; anyone, for everyone's
LOGGED_IN_EXAMPLES = 5  # a role, for everyone's operations
ANONYMOUS_EXAMPLES = 5  # without a session, where one is needed
REFUSED_EXAMPLES = 3  # another role, which is refused

# Query and path values that a schema's own generator seldom makes: digits
# that are not ASCII ("²" passes str.isdigit() and fails int()), numbers in
# other spellings, whitespace, control and format characters, separators.
NAUGHTY_VALUES = (
    *("²", "1²", "١٢", "\uff11\uff12", "\U0001d7d9", "Ⅻ", "0", "00", "-1", "+1", " 1", "1 "),
    *("1e3", "0x10", "1_0", "1.0", "NaN", "inf", "9" * 19, "9" * 400, "", " ", "\x00", "\t"),
    *("\n", "\u2028", "\ufeff", "%00", "%", ".", "..", "../", "/", "\\", "?", "#", "&", "="),
    *(";", "'", '"', "<b>", "null", "[]", "UTC", "Etc/../../etc/passwd", "é", "İ", "ﬁ", "😀"),
    "a" * 2000,
)
NAUGHTY = st.sampled_from(NAUGHTY_VALUES) | st.text(
    st.characters(categories=["Nd", "No", "Nl", "Zs", "Cc", "Cf"]), min_size=1, max_size=6
)
UNDOCUMENTED_QUERY = "x"  # a query parameter that no operation takes
# For a field of a JSON body, by its kind: moments at the ends of the
# calendar, integers past every storage's range, and not quite booleans.
NAUGHTY_MOMENT = st.sampled_from(
    ("9999-12-31T23:59:59+00:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00")
)
NAUGHTY_NUMBER = st.sampled_from((0, -1, 2**31, 2**63, -(2**63) - 1, 10**30, 1.5, 1e308))
NAUGHTY_FLAG = st.sampled_from((None, 1, "true"))


def operations_by_tag() -> dict[str, list[Operation]]:
    groups: dict[str, list[Operation]] = {}
    for result in SCHEMA.get_all_operations():
        if not isinstance(result, Ok):
            raise result.err()  # the document itself is broken
        operation = result.ok()
        groups.setdefault((operation.tags or ["untagged"])[0], []).append(operation)
    for operations in groups.values():
        operations.sort(key=lambda op: SCHEMA.get_operation_id(op) in LAST)
    return groups


GROUPS = operations_by_tag()


def callers(operation: Operation) -> list[tuple[str, int]]:
    """(role, examples) in the order they fuzz: the refused first, the owner last."""
    owner = next((OWNER[tag] for tag in operation.tags or [] if tag in OWNER), None)
    if owner is None:
        return [(ANONYMOUS, OWN_EXAMPLES)] + [(role, LOGGED_IN_EXAMPLES) for role in ROLES]
    refused = [(role, REFUSED_EXAMPLES) for role in ROLES if role != owner]
    return [(ANONYMOUS, ANONYMOUS_EXAMPLES), *refused, (owner, OWN_EXAMPLES)]


class World:
    """One organisation on the harness's app: a logged-in account per role,
    and fresh things for each operation to act on."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.origin = harness.origin
        self.cookies: dict[str, str] = {}
        self._made = 0

    async def log_everyone_in(self) -> None:
        for role in ROLES:
            who = await self.harness.professional(f"{role}@praktijk-noord.example", Role(role))
            # A login ends the session the request carries: the previous role's.
            self.harness.client.session.cookie_jar.clear()
            response = await self.harness.login(who)
            assert response.status == 200, await response.text()
            self.harness.clock.advance(30)  # as Harness.logged_in: the code is used up
            self.cookies[role] = response.cookies["vc_session"].value
        self.harness.client.session.cookie_jar.clear()

    async def targets(self, operation: Operation) -> dict[str, list[str]]:
        """Real values for the operation's path parameters, made for it alone."""
        names = {parameter.name for parameter in operation.path_parameters}
        values: dict[str, list[str]] = {}
        if "account_id" in names:
            values["account_id"] = [str(account) for account in await self._accounts()]
        if names & {"consult_id", "recording_id", "token"}:
            consults = [await self._consult(), await self._consult(started=True)]
            started = uuid.UUID(consults[1][0])
            values["consult_id"] = [consult for consult, _ in consults]
            values["recording_id"] = [
                str(await stored_recording(self.harness, started, b"\x1a\x45\xdf\xa3 media")),
                str(await stored_recording(self.harness, started, b"cut", complete=False)),
            ]
            # Invite links for /api/invites and /join, enrolment links for
            # /api/enrolment and /enrol, receipts for /api/receipts and
            # /receipt: each operation gets all six.
            values["token"] = [invite for _, invite in consults] + [
                await self._enrolment_link(),
                await self._enrolment_link(password_chosen=True),
                *[await self._receipt(*consults[1]) for _ in range(2)],
            ]
        if "endpoint_id" in names:
            values["endpoint_id"] = [await self._webhook_endpoint()]
        return values

    async def _webhook_endpoint(self) -> str:
        """A webhook endpoint of the organisation's (past the API's limit of ten)."""
        harness = self.harness
        endpoint_id = uuid.uuid4()
        organisation = await harness.organisation()
        sealed = seal(
            harness.app[MASTER_KEY].key, SECRET_PURPOSE, b"whsec_x", bound_to=str(endpoint_id)
        )
        async with harness.app[DB_ENGINE].begin() as conn:
            await conn.execute(
                webhook_endpoints.insert().values(
                    id=endpoint_id,
                    organisation_id=organisation.id,
                    url="https://records.praktijk-noord.example/hooks",
                    events=["consult.ended"],
                    secret_sealed=sealed,
                    created_at=harness.clock.now(),
                )
            )
        return str(endpoint_id)

    def _email(self, what: str) -> str:
        self._made += 1
        return f"{what}-{self._made}@praktijk-noord.example"

    async def _accounts(self) -> list[uuid.UUID]:
        """An active, an enrolling and a disabled account, none of them a role's."""
        harness = self.harness
        active = await harness.professional(self._email("active"), Role.THERAPIST)
        ids = [active.account_id]
        for disabled in (False, True):
            email = self._email("enrolling")
            await harness.invite(email, Role.SUPPORT)
            async with harness.app[DB_ENGINE].begin() as conn:
                account = await find_account_by_email(conn, email)
                assert account is not None
                if disabled:
                    await disable_account(conn, account, now=harness.clock.now())
            ids.append(account.id)
        return ids

    async def _consult(self, *, started: bool = False) -> tuple[str, str]:
        """A consult of the therapist's (id, invite token), with a technical-log entry."""
        response = await self.harness.client.post(
            "/api/consults",
            json={"display_name": "Mw. Jansen"},
            headers={**self.harness.headers, "Cookie": f"vc_session={self.cookies['therapist']}"},
        )
        assert response.status == 201, await response.text()
        created = await response.json()
        consult_id = created["consult"]["id"]
        now = self.harness.clock.now()
        async with self.harness.app[DB_ENGINE].begin() as conn:
            if started:
                await mark_started(conn, uuid.UUID(consult_id), now=now)
            await write_technical(
                conn,
                "client.media-error",
                now=now,
                subject=consult_id,
                detail={"role": "patient", "display_name": "Mw. Jansen", "note": "a@b.example"},
            )
        return consult_id, created["invite_token"]

    async def _receipt(self, consult_id: str, invite: str) -> str:
        """A receipt of the invite's (started) consult, as the patient's page asks for one."""
        response = await self.harness.issue_receipt(invite, consult_id)
        assert response.status == 201, await response.text()
        token: str = (await response.json())["receipt_token"]
        return token

    async def _enrolment_link(self, *, password_chosen: bool = False) -> str:
        token = await self.harness.invite(self._email("enrolling"), Role.THERAPIST)
        if password_chosen:
            chosen = await self.harness.post(
                f"/api/enrolment/{token}/password", {"password": "correct horse battery staple"}
            )
            assert chosen.status == 200, await chosen.text()
        return token


def naughty_value(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    kinds = schema.get("type", "string")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    if schema.get("format") == "date-time":
        return NAUGHTY_MOMENT
    if kinds & {"integer", "number"}:
        return NAUGHTY_NUMBER
    if "boolean" in kinds:
        return NAUGHTY_FLAG
    return NAUGHTY


def body_fields(operation: Operation) -> dict[str, Any]:
    """The fields of the operation's JSON object body, by name (none without one)."""
    for body in operation.body:
        if body.media_type == "application/json":
            return dict(body.optimized_schema.get("properties", {}))
    return {}


@st.composite
def with_naughty_field(draw: st.DrawFn, cases: Cases, fields: dict[str, Any]) -> Case[Any]:
    """A case whose JSON body has one field set to a naughty value of its kind."""
    case = draw(cases)
    name = draw(st.sampled_from(sorted(fields)))
    body = case.body if isinstance(case.body, dict) else {}
    case.body = {**body, name: draw(naughty_value(fields[name]))}
    return case


def strategy(operation: Operation, origin: str, cookie: str | None, targets: dict[str, list[str]]):
    """Positive and negative cases, with random and with real path values,
    and with one naughty query, path or body value."""
    fixed: dict[str, Any] = {"headers": {"Origin": origin}}
    if cookie is not None:
        fixed["cookies"] = {"vc_session": cookie}

    def cases(mode: GenerationMode = GenerationMode.POSITIVE, **given: Any) -> Cases:
        return operation.as_strategy(mode, **fixed, **given)

    path_names = [parameter.name for parameter in operation.path_parameters]
    if path_names and all(targets.get(name) for name in path_names):
        real = st.fixed_dictionaries({name: st.sampled_from(targets[name]) for name in path_names})

        def with_real_path(mode: GenerationMode = GenerationMode.POSITIVE, **given: Any) -> Cases:
            return real.flatmap(lambda values: cases(mode, path_parameters=values, **given))

    else:
        with_real_path = cases

    def naughty_query(choice: tuple[str, str]) -> Cases:
        name, value = choice
        return with_real_path(query={name: value})

    query_names = [parameter.name for parameter in operation.query] + [UNDOCUMENTED_QUERY]
    options = [
        cases(GenerationMode.POSITIVE),
        cases(GenerationMode.NEGATIVE),
        st.tuples(st.sampled_from(query_names), NAUGHTY).flatmap(naughty_query),
    ]
    if path_names:
        options += [
            with_real_path(GenerationMode.POSITIVE),
            with_real_path(GenerationMode.NEGATIVE),
        ]
        # Values that would change the route itself test the router, not the operation.
        in_segment = NAUGHTY.filter(lambda value: value not in {"", ".", ".."})
        options.append(
            st.tuples(st.sampled_from(path_names), in_segment).flatmap(
                lambda choice: cases(path_parameters={choice[0]: choice[1]})
            )
        )
    fields = body_fields(operation)
    if fields:
        options.append(with_naughty_field(with_real_path(), fields))
    return st.one_of(options)


def fuzz(
    operation: Operation,
    origin: str,
    cookie: str | None,
    targets: dict[str, list[str]],
    examples: int,
) -> None:
    """Runs in a worker thread: the app answers in the test's event loop."""
    with requests.Session() as http:

        @settings(
            max_examples=max(1, round(examples * SCALE)),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy(operation, origin, cookie, targets))
        def run(case: Case[Any]) -> None:
            case.call_and_validate(base_url=origin, session=http, checks=CHECKS)

        run()


@pytest.mark.parametrize("tag", list(GROUPS))
async def test_every_answer_is_documented(sqlite_harness: Harness, tag: str) -> None:
    world = World(sqlite_harness)
    await world.log_everyone_in()
    failures: list[str] = []
    for operation in GROUPS[tag]:
        targets = await world.targets(operation)
        for role, examples in callers(operation):
            cookie = world.cookies.get(role)
            try:
                await asyncio.to_thread(fuzz, operation, world.origin, cookie, targets, examples)
            except (Exception, BaseExceptionGroup) as exc:
                report = (
                    str(exc)
                    if isinstance(exc, FailureGroup)
                    else "".join(traceback.format_exception(exc))
                )
                failures.append(f"{operation.label} as {role}: {report}")
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
