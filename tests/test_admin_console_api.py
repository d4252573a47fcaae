"""The API behind the admin console: the account list's login days, the
enrolment link's QR code, the access log's filters and export, the retention
dry run and the practice's own settings (recording, invite validity); on
SQLite and PostgreSQL (``harness``) where something is stored."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from audit.access_log import chain_of
from audit.consults import create_consult, mark_ended, mark_started
from audit.practice import PracticeSettings, set_practice_settings
from audit.recordings import begin_recording
from audit.retention import Retention, purge
from audit.roles import Role
from audit.schema import access_log, consults, practice_settings
from server.app_keys import DB_ENGINE, FILE_STORE, MASTER_KEY, SETTINGS
from tests.support.harness import Harness, Professional, Sockets, new_consult, receive

NEW_ROUTES = [
    ("GET", "/api/admin/access-log/export"),
    ("GET", "/api/admin/retention/preview"),
    ("GET", "/api/admin/practice-settings"),
    ("PUT", "/api/admin/practice-settings"),
]


async def get(harness: Harness, path: str, **params: str) -> Any:
    return await harness.client.get(path, params=params, headers=harness.headers)


async def put(harness: Harness, path: str, body: object) -> Any:
    return await harness.client.put(path, json=body, headers=harness.headers)


async def admin_of(harness: Harness) -> Professional:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    return admin


async def logged_actions(harness: Harness, actor: uuid.UUID) -> list[str]:
    async with harness.app[DB_ENGINE].connect() as conn:
        found = await conn.execute(
            sa.select(access_log.c.action)
            .where(access_log.c.actor_id == actor)
            .order_by(access_log.c.id)
        )
        return list(found.scalars())


@pytest.mark.parametrize("role", [Role.THERAPIST, Role.SUPPORT])
@pytest.mark.parametrize(("method", "path"), NEW_ROUTES)
async def test_the_new_admin_routes_refuse_other_roles_and_log_it(
    sqlite_harness: Harness, role: Role, method: str, path: str
) -> None:
    someone = await sqlite_harness.professional("someone@praktijk-noord.example", role)
    await sqlite_harness.logged_in(someone)
    body = {"recording_allowed": True, "invite_validity_s": None}
    response = await sqlite_harness.client.request(
        method, path, json=body, headers=sqlite_harness.headers
    )
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "forbidden"
    async with sqlite_harness.app[DB_ENGINE].connect() as conn:
        refused = (
            await conn.execute(
                sa.select(access_log.c.actor_id).where(access_log.c.outcome == "refused")
            )
        ).scalars()
        assert list(refused) == [someone.account_id]


async def test_the_account_list_says_who_enrolled_and_the_day_of_the_last_login(
    harness: Harness,
) -> None:
    admin = await admin_of(harness)
    created = await harness.post(
        "/api/admin/accounts", {"email": "bram@praktijk-noord.example", "role": "therapist"}
    )
    assert created.status == 201
    listed = {
        a["email"]: a
        for a in (await (await get(harness, "/api/admin/accounts")).json())["accounts"]
    }
    today = harness.clock.now().date().isoformat()
    assert listed[admin.email]["last_login_on"] == today
    assert listed[admin.email]["enrolled_at"] is not None
    assert listed["bram@praktijk-noord.example"]["last_login_on"] is None
    assert listed["bram@praktijk-noord.example"]["enrolled_at"] is None


async def test_an_enrolment_link_comes_with_its_qr_code(sqlite_harness: Harness) -> None:
    await admin_of(sqlite_harness)
    created = await (
        await sqlite_harness.post(
            "/api/admin/accounts", {"email": "bram@praktijk-noord.example", "role": "support"}
        )
    ).json()
    assert created["enrolment_qr"].startswith("data:image/svg+xml;")
    assert "<svg" in created["enrolment_qr"].replace("%3C", "<")


async def records_of(harness: Harness, **params: str) -> list[dict[str, Any]]:
    response = await get(harness, "/api/admin/access-log", **params)
    assert response.status == 200, await response.text()
    records: list[dict[str, Any]] = (await response.json())["records"]
    return records


async def test_the_access_log_filters_by_actor_action_object_and_day(harness: Harness) -> None:
    admin = await admin_of(harness)
    bram = await harness.professional("bram@praktijk-noord.example", Role.THERAPIST)
    await harness.post(f"/api/admin/accounts/{bram.account_id}/disable")
    harness.clock.advance(86400 * 2)
    await harness.logged_in(admin)  # the session ended meanwhile
    await harness.post(f"/api/admin/accounts/{bram.account_id}/enable")

    by_action = await records_of(harness, action="account.disable")
    assert [r["object_id"] for r in by_action] == [str(bram.account_id)]
    # The first part of an action takes every action under it.
    under = {r["action"] for r in await records_of(harness, action="account")}
    assert {"account.disable", "account.enable", "account.create"} <= under
    assert all(a.startswith("account.") for a in under)
    on_bram = await records_of(harness, object=str(bram.account_id), actor=str(admin.account_id))
    assert [r["action"] for r in on_bram] == ["account.enable", "account.disable"]
    today = harness.clock.now().date()
    two_days_ago = (today - timedelta(days=2)).isoformat()
    that_day = await records_of(
        harness, **{"from": two_days_ago, "to": two_days_ago, "action": "account"}
    )
    assert "account.enable" not in {r["action"] for r in that_day}
    assert "account.disable" in {r["action"] for r in that_day}


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"actor": "anna"}, "'actor'"),
        ({"action": "account.%"}, "'action'"),
        ({"from": "2026-13-01"}, "'from'"),
        ({"from": "2026-11-02", "to": "2026-11-01"}, "'from' must not lie after 'to'"),
        ({"tz": "Mars/Olympus"}, "'tz'"),
        ({"sort": "asc"}, "unknown parameter 'sort'"),
        ({"object": "x" * 65}, "'object'"),
    ],
)
async def test_a_bad_access_log_filter_is_refused_naming_it(
    sqlite_harness: Harness, params: dict[str, str], named: str
) -> None:
    await admin_of(sqlite_harness)
    for path in ("/api/admin/access-log", "/api/admin/access-log/export"):
        response = await get(sqlite_harness, path, **params)
        assert response.status == 422
        assert named in (await response.json())["error"]["message"]


async def test_the_access_log_exports_as_csv_and_json_with_the_filters(harness: Harness) -> None:
    admin = await admin_of(harness)
    bram = await harness.professional("bram@praktijk-noord.example", Role.THERAPIST)
    await harness.post(f"/api/admin/accounts/{bram.account_id}/disable")

    as_csv = await get(
        harness, "/api/admin/access-log/export", format="csv", object=str(bram.account_id)
    )
    assert as_csv.status == 200
    assert as_csv.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in as_csv.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(await as_csv.text())))
    # Newest first, and only what concerns Bram's account.
    assert rows[0]["action"] == "account.disable"
    assert {row["object_id"] for row in rows} == {str(bram.account_id)}
    assert "account.create" in {row["action"] for row in rows}
    assert rows[0]["actor_id"] == str(admin.account_id)
    assert rows[0]["hash"]

    as_json = await get(harness, "/api/admin/access-log/export", format="json")
    assert as_json.status == 200
    exported = json.loads(await as_json.text())
    assert exported["organisation_id"] == str(admin.organisation.id)
    seqs = [record["seq"] for record in exported["records"]]
    assert seqs == sorted(seqs, reverse=True)
    assert "account.disable" in {record["action"] for record in exported["records"]}
    assert (await logged_actions(harness, admin.account_id))[-1] == "access_log.export"


async def test_an_export_larger_than_a_batch_holds_every_record_once(
    sqlite_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.api import admin_access_log

    monkeypatch.setattr(admin_access_log, "EXPORT_BATCH", 3)
    await admin_of(sqlite_harness)
    for _ in range(4):
        await get(sqlite_harness, "/api/admin/retention")
    whole = json.loads(
        await (await get(sqlite_harness, "/api/admin/access-log/export", format="json")).text()
    )
    seqs = [record["seq"] for record in whole["records"]]
    assert len(seqs) >= 7
    assert seqs == list(range(seqs[0], seqs[0] - len(seqs), -1))
    lines = (await (await get(sqlite_harness, "/api/admin/access-log/export")).text()).splitlines()
    assert lines[0].startswith("seq,at,actor_id")
    assert len(lines) == len(seqs) + 2  # the header, and the export's own record since


async def test_an_export_that_breaks_off_does_not_end_like_a_whole_one(
    sqlite_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a batch's read failing after the first bytes went out
    must not leave a download a browser takes for whole (a NEN 7513 answer
    missing records). The failure is a record of the third batch that the
    export cannot read (an outcome no record has, written by hand); the
    process log names the error's class, never the value."""
    from server.api import admin_access_log

    monkeypatch.setattr(admin_access_log, "EXPORT_BATCH", 3)
    admin = await admin_of(sqlite_harness)
    for _ in range(4):
        await get(sqlite_harness, "/api/admin/retention")
    chain = chain_of(admin.organisation.id)
    async with sqlite_harness.app[DB_ENGINE].begin() as conn:
        oldest = await conn.scalar(
            sa.select(sa.func.min(access_log.c.seq)).where(access_log.c.chain == chain)
        )
        await conn.execute(
            access_log.update()
            .where(access_log.c.chain == chain, access_log.c.seq == oldest)
            .values(outcome="jan-jansen")
        )
    with capture_logs() as logs:
        answer = await get(sqlite_harness, "/api/admin/access-log/export")
        assert answer.status == 200  # the headers went out before the failure
        with pytest.raises(aiohttp.ClientPayloadError):
            await answer.read()
    failed = [entry for entry in logs if entry["event"] == "access-log export failed"]
    assert [(entry["exit_status"], entry["error"]) for entry in failed] == [(1, "ValueError")]
    assert "jan-jansen" not in repr(logs)


async def old_consults(
    harness: Harness, therapist: Professional, ended_days_ago: list[int]
) -> None:
    now = harness.clock.now()
    async with harness.app[DB_ENGINE].begin() as conn:
        for days in ended_days_ago:
            at = now - timedelta(days=days, hours=1)
            consult = await create_consult(conn, therapist_id=therapist.account_id, now=at)
            await mark_started(conn, consult.id, now=at)
            await mark_ended(conn, consult.id, now=at + timedelta(minutes=30))


async def test_the_retention_preview_counts_what_the_next_run_would_remove_and_removes_nothing(
    harness: Harness,
) -> None:
    admin = await admin_of(harness)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await old_consults(harness, anna, [400, 100, 10])
    saved = await put(
        harness,
        "/api/admin/retention",
        {"consult_days": 365, "recording_days": 30, "access_log_days": 1825},
    )
    assert saved.status == 200

    preview = await (await get(harness, "/api/admin/retention/preview")).json()
    assert preview["consults"] == 1
    assert preview["recordings"] == 0
    assert preview["access_log_records"] == 0
    assert preview["retention"]["consult_days"] == 365
    # A shorter period, tried before it is saved.
    tried = await (await get(harness, "/api/admin/retention/preview", consult_days="30")).json()
    assert tried["consults"] == 2
    assert tried["retention"] == {"consult_days": 30, "recording_days": 30, "access_log_days": 1825}
    async with harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(consults)) == 3
    assert (await logged_actions(harness, admin.account_id))[-1] == "retention.preview"
    bad = await get(harness, "/api/admin/retention/preview", consult_days="0")
    assert bad.status == 422
    assert "'consult_days'" in (await bad.json())["error"]["message"]


async def test_the_preview_counts_the_recordings_that_go_with_their_consult_record(
    harness: Harness,
) -> None:
    """A consult's record may expire before its recording: the purge then
    destroys the recording with it, and the preview must say so (found in
    review: it counted recordings by their own period only)."""
    await admin_of(harness)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await old_consults(harness, anna, [10])
    async with harness.app[DB_ENGINE].begin() as conn:
        consult_id = await conn.scalar(sa.select(consults.c.id))
        assert consult_id is not None
        await begin_recording(
            conn,
            harness.app[FILE_STORE],
            harness.app[MASTER_KEY].key,
            consult_id,
            now=harness.clock.now() - timedelta(days=10),
        )
    wanted = {"consult_days": "7", "recording_days": "30"}
    preview = await (await get(harness, "/api/admin/retention/preview", **wanted)).json()
    assert (preview["consults"], preview["recordings"]) == (1, 1)
    # Both periods over: the recording is counted once.
    both = {"consult_days": "7", "recording_days": "7"}
    preview = await (await get(harness, "/api/admin/retention/preview", **both)).json()
    assert (preview["consults"], preview["recordings"]) == (1, 1)
    # The real run does what the preview said.
    saved = await put(
        harness,
        "/api/admin/retention",
        {"consult_days": 7, "recording_days": 30, "access_log_days": 1825},
    )
    assert saved.status == 200
    async with harness.app[DB_ENGINE].begin() as conn:
        report = await purge(
            conn,
            now=harness.clock.now(),
            defaults=Retention(consult_days=730, recording_days=30, access_log_days=1825),
        )
    assert (report.consults, report.recordings) == (1, 1)


async def test_practice_settings_start_as_the_servers_and_every_change_is_logged(
    harness: Harness,
) -> None:
    admin = await admin_of(harness)
    server_validity_s = harness.app[SETTINGS].consults.invite_validity_s
    first = await (await get(harness, "/api/admin/practice-settings")).json()
    assert first["recording_allowed"] is True
    assert first["invite_validity_s"] is None
    assert first["in_force"]["invite_validity_s"] == server_validity_s

    changed = await put(
        harness,
        "/api/admin/practice-settings",
        {"recording_allowed": False, "invite_validity_s": 3600},
    )
    assert changed.status == 200
    body = await changed.json()
    assert body["in_force"] == {"recording": False, "invite_validity_s": 3600}
    again = await (await get(harness, "/api/admin/practice-settings")).json()
    assert again["recording_allowed"] is False
    assert again["invite_validity_s"] == 3600
    assert (await logged_actions(harness, admin.account_id))[-2:] == [
        "practice_settings.update",
        "practice_settings.read",
    ]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"recording_allowed": True, "invite_validity_s": 60}, "invite_validity_s"),
        ({"recording_allowed": True, "invite_validity_s": 10**9}, "at most"),
        ({"recording_allowed": "yes", "invite_validity_s": None}, "recording_allowed"),
        ({"recording_allowed": True}, "invite_validity_s"),
    ],
)
async def test_a_practice_cannot_set_what_the_server_does_not_allow(
    sqlite_harness: Harness, body: dict[str, object], named: str
) -> None:
    await admin_of(sqlite_harness)
    response = await put(sqlite_harness, "/api/admin/practice-settings", body)
    assert response.status == 422
    assert named in (await response.json())["error"]["message"]


async def test_new_invites_follow_the_practices_validity(harness: Harness) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    async with harness.app[DB_ENGINE].begin() as conn:
        await set_practice_settings(
            conn,
            admin.organisation.id,
            PracticeSettings(recording_allowed=True, invite_validity_s=7200),
            now=harness.clock.now(),
        )
    therapist = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(therapist)
    now = harness.clock.now()
    created = await (await harness.post("/api/consults", {})).json()
    assert datetime.fromisoformat(created["invite_expires_at"]) == now + timedelta(seconds=7200)
    consult_id = created["consult"]["id"]
    reissued = await (await harness.post(f"/api/consults/{consult_id}/invite")).json()
    assert datetime.fromisoformat(reissued["invite_expires_at"]) == now + timedelta(seconds=7200)
    # Another practice keeps the server's validity.
    other = await harness.professional(
        "bert@praktijk-zuid.example", Role.THERAPIST, organisation="Praktijk Zuid"
    )
    await harness.logged_in(other)
    theirs = await (await harness.post("/api/consults", {})).json()
    server_s = harness.app[SETTINGS].consults.invite_validity_s
    later = harness.clock.now()
    assert datetime.fromisoformat(theirs["invite_expires_at"]) == later + timedelta(
        seconds=server_s
    )


async def test_a_practice_that_does_not_allow_recording_has_requests_refused(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness)
    socket = await sockets.therapist(setup.consult_id)
    await receive(socket, "welcome")
    # Allowed (the server's default): the request reaches the room, which wants a patient.
    await socket.send_json({"v": 1, "type": "record-request"})
    allowed = await receive(socket, "error")
    assert allowed["code"] != "recording_unavailable"
    async with harness.app[DB_ENGINE].begin() as conn:
        await set_practice_settings(
            conn,
            setup.therapist.organisation.id,
            PracticeSettings(recording_allowed=False, invite_validity_s=None),
            now=harness.clock.now(),
        )
    await socket.send_json({"v": 1, "type": "record-request"})
    refused = await receive(socket, "error")
    assert refused["code"] == "recording_unavailable"
    assert "practice does not allow recording" in refused["message"]
    # A patient asking is refused for being the patient (counted as
    # misbehaviour), not told about the practice (found in review).
    patient = await sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    await patient.send_json({"v": 1, "type": "record-request"})
    assert (await receive(patient, "error"))["code"] == "not_allowed"


async def test_two_first_saves_of_practice_settings_at_once_both_succeed(
    harness: Harness,
) -> None:
    """Found in review: both updated no row, and the second insert failed on
    the organisation's key (a 500 for a double-click)."""
    organisation = await harness.organisation()
    engine = harness.app[DB_ENGINE]

    async def save(validity_s: int) -> None:
        async with engine.begin() as conn:
            await set_practice_settings(
                conn,
                organisation.id,
                PracticeSettings(recording_allowed=True, invite_validity_s=validity_s),
                now=harness.clock.now(),
            )

    await asyncio.gather(save(3600), save(7200))
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(practice_settings))).all()
    assert len(rows) == 1
    assert rows[0].invite_validity_s in {3600, 7200}


async def test_a_database_blip_refuses_the_record_request_and_the_call_goes_on(
    harness: Harness, sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the database error left the read loop and ended the
    therapist's socket. The outage is simulated (the practice lookup raises
    as SQLAlchemy does when the database is away): stopping the real database
    under one socket would stop every other test's too."""
    setup = await new_consult(harness)
    socket = await sockets.therapist(setup.consult_id)
    await receive(socket, "welcome")

    async def away(*_args: object) -> bool:
        raise sa.exc.OperationalError("SELECT", {}, ConnectionRefusedError())

    monkeypatch.setattr("server.ws.reader.recording_allowed_for_consult", away)
    await socket.send_json({"v": 1, "type": "record-request"})
    refused = await receive(socket, "error")
    assert refused["code"] == "unavailable"
    await socket.send_json({"v": 1, "type": "ping"})
    assert (await receive(socket, "pong"))["type"] == "pong"
    assert not socket.closed
