"""The technical log's sink: diagnostics go to the 24-hour table, never to
stdout; clients report ICE and media trouble over the socket."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from audit.accounts import Role
from audit.clock import ManualClock
from audit.schema import technical_log
from audit.technical_log import (
    FLUSH_SLICE,
    DropReason,
    TechnicalLog,
    purge_technical_log,
    read_technical,
)
from server.app_keys import DB_ENGINE, TECHNICAL_LOG
from tests.support.harness import Harness, Sockets, admitted_pair, new_consult, receive


async def flushed(harness: Harness) -> None:
    await harness.app[TECHNICAL_LOG].flush(harness.app[DB_ENGINE])


async def entries(
    harness: Harness, subject: str | None = None
) -> list[tuple[str, dict[str, object]]]:
    await flushed(harness)
    async with harness.app[DB_ENGINE].connect() as conn:
        found = await read_technical(conn, now=harness.clock.now(), subject=subject)
    return [(entry.kind, dict(entry.detail)) for entry in reversed(found)]


def test_the_sink_keeps_entries_and_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    clock = ManualClock()
    technical = TechnicalLog(clock, max_pending=3)
    consult = uuid.uuid4()
    technical.log.info("ice-state", subject=consult, state="failed", address="192.0.2.7")
    clock.advance(5)
    technical.log.warning("media-error", subject=consult, name="NotAllowedError")
    assert technical.pending == 2
    for n in range(3):
        technical.log.info("filler", n=n)
    assert (technical.pending, technical.dropped[DropReason.PENDING_FULL]) == (3, 2)
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""


async def test_entries_are_written_in_one_go_and_read_for_24_hours(harness: Harness) -> None:
    technical = harness.app[TECHNICAL_LOG]
    subject = str(uuid.uuid4())
    technical.log.info("ice-state", subject=subject, state="checking", address="192.0.2.7")
    technical.log.info("ice-state", subject=subject, state="failed")
    assert await entries(harness, subject) == [
        ("ice-state", {"state": "checking", "address": "192.0.2.7"}),
        ("ice-state", {"state": "failed"}),
    ]
    assert technical.pending == 0
    harness.clock.advance(24 * 3600 + 1)
    assert await entries(harness, subject) == []


async def test_a_backlog_is_written_a_slice_at_a_time(harness: Harness) -> None:
    """An admission storm leaves thousands of entries for one write: all in
    one statement held the event loop for the whole batch's conversion (5,000
    entries about 40 ms on PostgreSQL, 50 on SQLite; the loop's budget is 10
    ms). They go in slices, the loop free between them, in one transaction."""
    technical = harness.app[TECHNICAL_LOG]
    subject = str(uuid.uuid4())
    rows_per_statement: list[int] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO TECHNICAL_LOG"):
            many = (
                isinstance(parameters, list | tuple)
                and parameters
                and not isinstance(parameters[0], str | int | float | bytes | type(None))
            )
            rows_per_statement.append(len(parameters) if many else 1)

    engine = harness.app[DB_ENGINE].sync_engine
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        for number in range(1200):
            technical.log.info("ice-state", subject=subject, number=number)
        await technical.flush(harness.app[DB_ENGINE])
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    assert sum(rows_per_statement) == 1200
    assert max(rows_per_statement) <= FLUSH_SLICE
    assert len(rows_per_statement) >= 1200 // FLUSH_SLICE
    async with harness.app[DB_ENGINE].connect() as conn:
        found = await read_technical(conn, now=harness.clock.now(), subject=subject, limit=2000)
    # In the order logged (the ids follow it; the list is newest first).
    assert [entry.detail["number"] for entry in reversed(found)] == list(range(1200))


async def test_a_failed_write_keeps_the_entries_for_the_next_try(harness: Harness) -> None:
    technical = TechnicalLog(harness.clock)
    technical.log.info("ice-state", subject="x", state="failed")
    broken = create_async_engine("sqlite+aiosqlite:////nonexistent/dir/db.sqlite")
    with pytest.raises(sa.exc.OperationalError):
        await technical.flush(broken)
    await broken.dispose()
    assert technical.pending == 1
    assert await technical.flush(harness.app[DB_ENGINE]) == 1


async def test_sockets_note_address_and_browser_and_refusals(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness)
    therapist = await harness.client.ws_connect(
        f"/ws?consult={setup.consult_id}",
        headers={**harness.headers, "User-Agent": "TestBrowser/1.0"},
    )
    await receive(therapist, "welcome")
    found = await entries(harness, setup.consult_id)
    client = next(detail for kind, detail in found if kind == "signaling.client")
    assert client["role"] == "therapist"
    assert client["user_agent"] == "TestBrowser/1.0"
    assert client["address"] == "127.0.0.1"
    assert any(kind == "signaling.connected" for kind, _ in found)
    refused = await harness.client.get("/ws?ticket=nonsense", headers=harness.headers)
    assert refused.status == 401
    everything = await entries(harness)
    assert ("signaling.refused", "ticket_invalid") in [
        (kind, detail.get("reason")) for kind, detail in everything
    ]
    await therapist.close()


async def test_clients_report_ice_and_media_trouble_and_nothing_is_relayed(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    await patient.send_json(
        {
            "v": 1,
            "type": "report",
            "event": "call-failed",
            "detail": {
                "ice": "failed",
                "candidatePair": "relay/udp",
                "bytesReceived": 0,
                "rttMs": None,
            },
        }
    )
    await patient.send_json(
        {"v": 1, "type": "report", "event": "media-error", "detail": {"camera": "NotAllowedError"}}
    )
    await patient.send_json({"v": 1, "type": "ping"})
    await receive(patient, "pong")
    found = await entries(harness, setup.consult_id)
    reports = [
        (kind, detail["detail"], detail["role"])
        for kind, detail in found
        if kind.startswith("client.")
    ]
    assert reports == [
        (
            "client.call-failed",
            {"ice": "failed", "candidatePair": "relay/udp", "bytesReceived": 0, "rttMs": None},
            "patient",
        ),
        ("client.media-error", {"camera": "NotAllowedError"}, "patient"),
    ]
    # The therapist got none of it.
    await therapist.send_json({"v": 1, "type": "ping"})
    assert (await therapist.receive_json(timeout=5))["type"] == "pong"


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ({"event": "gossip"}, "field 'event'"),
        ({"event": "stats", "detail": {"x": "y" * 201}}, "detail"),
        ({"event": "stats", "detail": {f"k{n}": n for n in range(21)}}, "detail"),
        ({"event": "stats", "detail": {"nested": {"a": 1}}}, "detail"),
        ({"event": "stats", "extra": 1}, "'extra' is not part of a report message"),
    ],
)
async def test_bad_reports_get_an_error_naming_the_problem(
    sqlite_harness: Harness, sqlite_sockets: Sockets, report: dict[str, object], expected: str
) -> None:
    setup = await new_consult(sqlite_harness)
    therapist = await sqlite_sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    await therapist.send_json({"v": 1, "type": "report", **report})
    error = await receive(therapist, "error")
    assert error["code"] == "invalid_message"
    assert error["ref"] == "report"
    assert expected in error["message"]
    assert not any(kind.startswith("client.") for kind, _ in await entries(sqlite_harness))


async def test_the_writer_task_writes_without_being_asked(harness: Harness) -> None:
    import asyncio

    subject = str(uuid.uuid4())
    harness.app[TECHNICAL_LOG].log.info("ice-state", subject=subject, state="new")
    for _ in range(50):
        async with harness.app[DB_ENGINE].connect() as conn:
            found = await read_technical(conn, now=harness.clock.now(), subject=subject)
        if found:
            break
        await asyncio.sleep(0.1)
    assert [entry.kind for entry in found] == ["ice-state"]
    assert found[0].at == harness.clock.now()
    assert harness.clock.now() - found[0].at < timedelta(seconds=1)


# A report as big as the protocol lets it be: 20 fields of 200 characters.
BIG_DETAIL = {f"field{n}": "x" * 200 for n in range(20)}


@pytest.mark.settings(signaling_rate_per_s=1000, signaling_burst=1000)
async def test_a_clients_reports_past_its_quota_are_dropped_and_said_once(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    for _ in range(60):  # ~260 KB: eight times what one connection may write
        await patient.send_json(
            {"v": 1, "type": "report", "event": "media-error", "detail": BIG_DETAIL}
        )
    await patient.send_json({"v": 1, "type": "ping"})
    await receive(patient, "pong")  # every report before it was handled
    kinds = [kind for kind, _detail in await entries(harness, setup.consult_id)]
    kept = kinds.count("client.media-error")
    assert 1 <= kept <= 8  # 32 KiB of ~4.4 KB frames
    assert kinds.count("client.reports_dropped") == 1
    technical = harness.app[TECHNICAL_LOG]
    assert technical.dropped[DropReason.REPORT_QUOTA] == 60 - kept
    # The other participant's reports have a quota of their own.
    await therapist.send_json({"v": 1, "type": "report", "event": "ice-state", "detail": {}})
    await therapist.send_json({"v": 1, "type": "ping"})
    await receive(therapist, "pong")
    assert "client.ice-state" in [kind for kind, _ in await entries(harness, setup.consult_id)]


async def test_a_full_table_keeps_what_it_holds_and_takes_more_after_the_purge(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    engine = harness.app[DB_ENGINE]
    clock = harness.clock
    technical = TechnicalLog(clock, max_rows=1000)
    for n in range(1200):
        technical.log.info("filler", n=n)
    assert await technical.flush(engine) == 1000
    assert technical.dropped[DropReason.STORE_FULL] == 200
    technical.log.info("one more")
    assert await technical.flush(engine) == 0
    assert technical.dropped[DropReason.STORE_FULL] == 201
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(technical_log)) == 1000
    # A day later the purge makes room; the log takes entries again.
    clock.advance(24 * 3600 + 1)
    async with engine.begin() as conn:
        assert await purge_technical_log(conn, now=clock.now()) == 1000
    technical.recount()
    technical.log.info("after the purge")
    assert await technical.flush(engine) == 1


async def _raw_request(harness: Harness, head: bytes) -> bytes:
    """One HTTP request written byte for byte (a client may send any bytes)."""
    url = harness.client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


async def test_no_entry_a_client_can_cause_holds_back_anyone_elses(
    harness: Harness, sockets: Sockets
) -> None:
    """Found in review: a report holding NaN or Infinity (``1e999`` is valid
    JSON and reads as infinity) was taken, and PostgreSQL's ``json`` refused
    the batch it was in at every try, so no node's diagnostics were written
    any more; SQLite stored it, and support's answer was not JSON. A browser
    name that is not UTF-8 (read by aiohttp with surrogate escapes) did the
    same through the socket's refusal note, without any login."""
    setup, _therapist, patient = await admitted_pair(harness, sockets)
    for number in ("NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 5000):
        await patient.send_str(
            '{"v": 1, "type": "report", "event": "stats", "detail": {"rtt": ' + number + "}}"
        )
        error = await receive(patient, "error")
        assert error["code"] == "invalid_message", error
        assert error["message"].startswith("field 'detail.rtt': must be"), error
    host = harness.client.make_url("/").authority
    answer = await _raw_request(
        harness,
        b"GET /ws?ticket=x HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
        b"Origin: " + harness.origin.encode() + b"\r\n"
        b"User-Agent: Mozilla/5.0 \xff\xfe\xed\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    # Another consult's diagnostics are written, at once.
    other = await new_consult(harness, "bram@praktijk-noord.example")
    bram = await sockets.therapist(other.consult_id)
    await receive(bram, "welcome")
    await bram.send_json({"v": 1, "type": "report", "event": "ice-state", "detail": {"ice": "ok"}})
    await bram.send_json({"v": 1, "type": "ping"})
    await receive(bram, "pong")
    technical = harness.app[TECHNICAL_LOG]
    await flushed(harness)
    assert technical.pending == 0
    assert [kind for kind, _ in await entries(harness, other.consult_id)][-1] == "client.ice-state"
    refusals = [detail for kind, detail in await entries(harness) if kind == "signaling.refused"]
    assert str(refusals[-1]["user_agent"]).startswith("Mozilla/5.0 "), refusals
    # What support reads of the patient's consult is JSON.
    sam = await harness.professional("sam@praktijk-noord.example", Role.SUPPORT)
    await harness.logged_in(sam)
    response = await harness.client.get(f"/api/support/consults/{setup.consult_id}/technical-log")
    text = await response.text()
    assert response.status == 200, text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in support's answer"))


async def test_a_row_the_database_refuses_is_dropped_and_the_rest_written(
    harness: Harness,
) -> None:
    """However a row came to be one the database will not take, it must not
    hold back the rows beside it at every later try."""
    technical = TechnicalLog(harness.clock)
    technical.log.info("before", subject="x", n=1)
    # No writer makes such a row (kind is always set); it stands for any value
    # the database refuses that is not an outage.
    refused: dict[str, Any] = {
        "at": harness.clock.now(),
        "kind": None,
        "subject": None,
        "detail": {},
    }
    technical._pending.append(refused)
    technical.log.info("after", subject="x", n=2)
    assert await technical.flush(harness.app[DB_ENGINE]) == 2
    assert (technical.pending, technical.dropped[DropReason.UNWRITABLE]) == (0, 1)
    async with harness.app[DB_ENGINE].connect() as conn:
        found = await read_technical(conn, now=harness.clock.now(), subject="x")
    assert sorted(entry.kind for entry in found) == ["after", "before"]
