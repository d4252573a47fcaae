"""Reads take no write lock on SQLite (issue 19): a read endpoint's own reads
go through ``audit.db.reading()`` (no BEGIN on SQLite: each statement a
transaction of its own), so they neither wait behind a writer nor hold one up.

The engine begins every other transaction with BEGIN IMMEDIATE, which takes
SQLite's one write lock at once. Two writes remain in a logged-in read: the
session's touch (its idle timeout; at most once a minute, see
server/auth/sessions.py) and the access record of the read (through the
group-commit writer); those, and nothing else, may take the lock. So a
logged-in read still waits while another connection holds the lock (for its
record, not for its reads); the reads that write nothing answer meanwhile.

A read's access record goes through the writer (``server.api.access_records.
record_read``), never in a write transaction of the request's own: batched
with every other request's records, one commit for many. The writer's
transactions run in its own task (``access-log-writer``), which is how the
test tells them apart. Refusals answered by a read endpoint (an unknown id:
404) are read records too, through the writer as well.

On SQLite only: on PostgreSQL ``reading()`` is autocommit, and no read
takes a lock there either way.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from audit.consults import mark_started
from audit.roles import Role
from server.app_keys import DB_ENGINE, DB_STATEMENTS
from server.background import JobName
from server.webhooks import DELIVERY_TASK
from tests.support.cli import sqlite_write_lock_held
from tests.support.harness import Harness, Professional, new_consult, stored_recording

THERAPIST, SUPPORT, ADMIN, NOBODY = "therapist", "support", "admin", "nobody"


@dataclass
class World:
    """An organisation with one of each: a consult with a receipt and a
    recording, a webhook endpoint, and a logged-in account per role."""

    therapist: Professional
    support: Professional
    admin: Professional
    consult_id: str
    invite_token: str
    receipt_token: str
    recording_id: uuid.UUID
    endpoint_id: str
    enrolment_token: str

    def path(self, template: str) -> str:
        return template.format(
            consult=self.consult_id,
            invite=self.invite_token,
            receipt=self.receipt_token,
            recording=self.recording_id,
            endpoint=self.endpoint_id,
            account=self.therapist.account_id,
            enrolment=self.enrolment_token,
            unknown=uuid.UUID(int=1),
        )


async def world_of(harness: Harness) -> World:
    setup = await new_consult(harness)
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_started(conn, uuid.UUID(setup.consult_id), now=harness.clock.now())
    receipt = await harness.issue_receipt(setup.invite_token, setup.consult_id)
    assert receipt.status == 201, await receipt.text()
    recording_id = await stored_recording(harness, setup.consult_id, b"\x1a\x45\xdf\xa3" * 64)
    support = await harness.professional("sam@praktijk-noord.example", Role.SUPPORT)
    admin = await harness.professional("ada@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    endpoint = await harness.post(
        "/api/admin/webhooks",
        {"url": "https://records.example/hook", "events": ["consult.started"]},
    )
    assert endpoint.status == 201, await endpoint.text()
    invited = await harness.post(
        "/api/admin/accounts", {"email": "tess@praktijk-noord.example", "role": "therapist"}
    )
    assert invited.status == 201, await invited.text()
    return World(
        setup.therapist,
        support,
        admin,
        setup.consult_id,
        setup.invite_token,
        (await receipt.json())["receipt_token"],
        recording_id,
        (await endpoint.json())["endpoint"]["id"],
        (await invited.json())["enrolment_token"],
    )


async def as_role(harness: Harness, world: World, role: str) -> None:
    harness.client.session.cookie_jar.clear()
    who = {THERAPIST: world.therapist, SUPPORT: world.support, ADMIN: world.admin}.get(role)
    if who is not None:
        await harness.logged_in(who)


# Every read-only endpoint that reads the database, with the role it needs
# (and the answer expected: a refusal of an unknown id is a read, recorded).
_READS: list[tuple[str, str] | tuple[str, str, int]] = [
    (THERAPIST, "/api/consults"),
    (THERAPIST, "/api/consults/{consult}"),
    (THERAPIST, "/api/recordings"),
    (THERAPIST, "/api/recordings/{recording}/download"),
    (THERAPIST, "/api/recordings/{recording}/media"),
    (THERAPIST, "/api/recordings/{unknown}/download", 404),
    (THERAPIST, "/api/recordings/{unknown}/media", 404),
    (THERAPIST, "/api/account/export"),
    (SUPPORT, "/api/support/consults"),
    (SUPPORT, "/api/support/charts/consults-per-day.svg"),
    (SUPPORT, "/api/support/charts/durations.svg"),
    (SUPPORT, "/api/support/consults/{consult}/technical-log"),
    (ADMIN, "/api/admin/accounts"),
    (ADMIN, "/api/admin/accounts/{account}"),
    (ADMIN, "/api/admin/accounts/{unknown}", 404),
    (ADMIN, "/api/admin/retention"),
    (ADMIN, "/api/admin/retention/preview"),
    (ADMIN, "/api/admin/practice-settings"),
    (ADMIN, "/api/admin/access-log"),
    (ADMIN, "/api/admin/access-log/export"),
    (ADMIN, "/api/admin/access-log/verify"),
    (ADMIN, "/api/admin/billing?month=2026-11"),
    (ADMIN, "/api/admin/webhooks"),
    (ADMIN, "/api/admin/webhooks/{endpoint}/deliveries"),
    (ADMIN, "/api/admin/webhooks/{unknown}/deliveries", 404),
    (ADMIN, "/api/session"),
    (NOBODY, "/api/enrolment/{enrolment}"),
    (NOBODY, "/api/invites/{invite}"),
    (NOBODY, "/api/receipts/{receipt}"),
    (NOBODY, "/receipt/{receipt}"),
    (NOBODY, "/readyz"),
]
READS = [(*entry, 200)[:3] for entry in _READS]  # 200 unless said
# Those not recorded in the access log: the patient's invite (what the link
# opens), the receipt's page (its data comes from /api/receipts, recorded),
# and the health check.
UNRECORDED = {"/api/invites/{invite}", "/receipt/{receipt}", "/readyz"}
RECORDED = {template for _, template, _ in READS} - UNRECORDED

_TABLE = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE)\s+\"?(\w+)", re.IGNORECASE)
_ACCESS_LOG_COLUMN = re.compile(r"\baccess_log\.(\w+)")
# What a read request may write, and read while it holds the lock to write it:
# the session's touch (the session and its account checked first), and the
# access record (the chain's head read first: its last seq and hash, or its
# checkpoint).
_SESSION_CHECK = {"sessions", "accounts"}
_ACCESS_RECORD = {"access_log", "access_log_checkpoints"}
_CHAIN_HEAD = {"chain", "seq", "hash"}


# The name of the access-log writer's task (audit/access_writer.py).
WRITER_TASK = "access-log-writer"
# The periodic jobs' tasks are named after their jobs (server/background.py),
# the webhooks job's sends apart.
PERIODIC_JOBS = {job.value for job in JobName} | {DELIVERY_TASK}


@dataclass
class Transaction:
    begin: str
    task: str  # the name of the asyncio task that ran it
    statements: list[str]

    @property
    def tables(self) -> set[str]:
        return {name for sql in self.statements for name in _TABLE.findall(sql)}

    @property
    def access_log_columns_read(self) -> set[str]:
        return {
            name
            for sql in self.statements
            if sql.startswith("SELECT")
            for name in _ACCESS_LOG_COLUMN.findall(sql)
        }

    @property
    def writes(self) -> bool:
        return any(sql.split()[0] in {"INSERT", "UPDATE", "DELETE"} for sql in self.statements)

    @property
    def by_writer(self) -> bool:
        return self.task == WRITER_TASK

    @property
    def is_session_touch(self) -> bool:
        return self.tables <= _SESSION_CHECK

    @property
    def is_access_record(self) -> bool:
        return self.tables <= _ACCESS_RECORD and self.access_log_columns_read <= _CHAIN_HEAD


def _task_name() -> str:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # SQLite's thread of the way in (audit/sqlite_direct.py)
        return "sqlite-thread"
    return "" if task is None else task.get_name()


@pytest.mark.parametrize(("role", "template", "status"), READS)
async def test_a_read_takes_the_write_lock_only_for_its_session_and_access_record(
    sqlite_harness: Harness, role: str, template: str, status: int
) -> None:
    harness = sqlite_harness
    world = await world_of(harness)
    await as_role(harness, world, role)
    engine = harness.app[DB_ENGINE]
    # Per connection, its transactions in order (SQLite's BEGINs are statements).
    seen: dict[int, list[Transaction]] = {}

    # Reads without any BEGIN (``reading()``, and SQLite's thread of the way
    # in, audit/sqlite_direct.py): each such read is a transaction of its
    # own, which takes no write lock. The engine's COMMIT and ROLLBACK are
    # the driver's calls, not statements: their events end a transaction.
    ended: set[int] = set()

    def on_end(conn: Any) -> None:
        ended.add(id(conn))

    def on_execute(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sql = " ".join(statement.split())
        if sql.startswith("BEGIN"):
            seen.setdefault(id(conn), []).append(Transaction(sql, _task_name(), []))
            ended.discard(id(conn))
        elif sql in {"COMMIT", "ROLLBACK"}:
            ended.add(id(conn))
        elif seen.get(id(conn)) and id(conn) not in ended:
            seen[id(conn)][-1].statements.append(sql)
        else:
            seen.setdefault(id(conn), []).append(Transaction("(none)", _task_name(), [sql]))
            ended.add(id(conn))

    thread_engine = harness.app[DB_STATEMENTS].thread_engine
    engines = [engine.sync_engine, *([thread_engine] if thread_engine is not None else [])]
    for listened in engines:
        event.listen(listened, "before_cursor_execute", on_execute)
    event.listen(engine.sync_engine, "commit", on_end)
    event.listen(engine.sync_engine, "rollback", on_end)
    try:
        response = await harness.client.get(world.path(template), headers=harness.headers)
        body = await response.read()
    finally:
        for listened in engines:
            event.remove(listened, "before_cursor_execute", on_execute)
        event.remove(engine.sync_engine, "commit", on_end)
        event.remove(engine.sync_engine, "rollback", on_end)
    assert response.status == status, body[:300]
    # The request's and the access-log writer's; not the periodic jobs', which
    # run when they are due (the webhooks job claims its deliveries under
    # the write lock; once it was due during a request and failed this test).
    transactions = [t for each in seen.values() for t in each if t.task not in PERIODIC_JOBS]
    assert transactions, "the request read nothing from the database"
    locked = [t for t in transactions if t.begin == "BEGIN IMMEDIATE"]
    for transaction in locked:
        assert transaction.writes, f"a write lock for reading only: {transaction.statements}"
        assert transaction.is_session_touch or transaction.is_access_record, (
            f"read under the write lock: {transaction.statements}"
        )
    # The request's own write transactions: none. The session was marked seen
    # at its login, under a minute ago, so its check writes nothing; the
    # access record is the writer's (one batch: nothing else ran meanwhile).
    own = [t for t in locked if not t.by_writer]
    assert not [t for t in own if "access_log" in t.tables], (
        f"an access record written outside the access-log writer: {[t.statements for t in own]}"
    )
    assert not own, [t.statements for t in own]
    by_writer = [t for t in locked if t.by_writer]
    assert len(by_writer) == (1 if template in RECORDED else 0), [t.statements for t in by_writer]


# Reads that need no session (whose touch writes) and no access record (which
# waits for the lock as every write does): they answer while a writer holds it.
UNLOGGED_READS = ["/api/invites/{invite}", "/receipt/{receipt}", "/readyz"]


async def test_reads_without_a_write_answer_while_another_connection_holds_the_write_lock(
    sqlite_harness: Harness, data_dir: Path
) -> None:
    harness = sqlite_harness
    world = await world_of(harness)
    harness.client.session.cookie_jar.clear()
    # A writer of another process or connection: a purge, the CLI.
    with sqlite_write_lock_held(data_dir):
        # A write queued behind it: the patient's ticket notes the invite's use.
        ticket = asyncio.create_task(
            harness.client.post(
                f"/api/invites/{world.invite_token}/ticket",
                json={"consent": True},
                headers=harness.headers,
            )
        )
        for template in UNLOGGED_READS:
            async with asyncio.timeout(2):  # the lock waits up to 5 s (connect_timeout_s)
                response = await harness.client.get(world.path(template))
            assert response.status == 200, (template, await response.text())
        assert not ticket.done(), "the write did not wait for the lock"
    answer = await ticket
    assert answer.status == 200, await answer.text()
