"""The billing export (issue 21, item 6): a month of an organisation's
consults per therapist, as JSON, CSV and a CSV for Excel, for its admin
(API) and the operator (command line); on SQLite and PostgreSQL;
access-logged. The CSVs' cells: tests/test_billing_csv.py."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from audit.accounts import Role
from audit.consults import create_consult, mark_ended, mark_started
from audit.schema import access_log
from server.app_keys import DB_ENGINE
from tests.support.cli import cli_env, run_cli
from tests.support.databases import QUICK_ON_SQLITE
from tests.support.harness import Harness, Professional

NOV = datetime(2026, 11, 1, tzinfo=UTC)


async def consult(
    harness: Harness,
    therapist: Professional,
    *,
    created: datetime,
    started: datetime | None = None,
    minutes: int = 0,
    scheduled: datetime | None = None,
) -> uuid.UUID:
    """A consult made at ``created``; started and held ``minutes`` if ``started``."""
    async with harness.app[DB_ENGINE].begin() as conn:
        made = await create_consult(
            conn, therapist_id=therapist.account_id, now=created, scheduled_at=scheduled
        )
        if started is not None:
            await mark_started(conn, made.id, now=started)
            await mark_ended(conn, made.id, now=started + timedelta(minutes=minutes))
    return made.id


@dataclass
class Month:
    people: dict[str, Professional]
    ids: dict[str, uuid.UUID]

    def __getitem__(self, name: str) -> uuid.UUID:
        return self.ids[name]


async def a_month(harness: Harness) -> Month:
    """Two therapists of Praktijk Noord and one of Praktijk Zuid, with consults
    in October, November (by start, by appointment, by creation) and December."""
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    bert = await harness.professional("bert@praktijk-noord.example", Role.THERAPIST)
    zuid = await harness.professional("zoe@praktijk-zuid.example", Role.THERAPIST, "Praktijk Zuid")
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    ids = {
        # Made in October, held on 2 November: November's.
        "anna_held": await consult(
            harness,
            anna,
            created=NOV - timedelta(days=3),
            started=NOV + timedelta(days=1, hours=9),
            minutes=50,
        ),
        "anna_unstarted": await consult(
            harness, anna, created=NOV + timedelta(days=5), scheduled=NOV + timedelta(days=6)
        ),
        "bert_held": await consult(
            harness,
            bert,
            created=NOV + timedelta(days=10),
            started=NOV + timedelta(days=10, hours=1),
            minutes=25,
        ),
        # 30 November 23:30 UTC is 1 December in Amsterdam.
        "bert_late": await consult(
            harness,
            bert,
            created=NOV + timedelta(days=29),
            started=datetime(2026, 11, 30, 23, 30, tzinfo=UTC),
            minutes=10,
        ),
        "october": await consult(
            harness,
            anna,
            created=NOV - timedelta(days=5),
            started=NOV - timedelta(days=5),
            minutes=5,
        ),
        "other_practice": await consult(
            harness,
            zuid,
            created=NOV + timedelta(days=2),
            started=NOV + timedelta(days=2),
            minutes=45,
        ),
    }
    await harness.logged_in(admin)
    return Month({"anna": anna, "bert": bert, "admin": admin}, ids)


async def test_an_admin_exports_a_month_of_the_practices_consults_per_therapist(
    harness: Harness,
) -> None:
    month = await a_month(harness)
    response = await harness.client.get("/api/admin/billing?month=2026-11")
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert (body["month"], body["time_zone"]) == ("2026-11", "UTC")
    rows = body["consults"]
    assert [row["consult_id"] for row in rows] == [
        str(month["anna_held"]),
        str(month["anna_unstarted"]),
        str(month["bert_held"]),
        str(month["bert_late"]),
    ]
    held = rows[0]
    assert held == {
        "therapist_id": str(month.people["anna"].account_id),
        "therapist": "anna@praktijk-noord.example",
        "therapist_external_id": None,
        "consult_id": str(month["anna_held"]),
        "date": "2026-11-02",
        "scheduled_at": None,
        "started_at": "2026-11-02T09:00:00Z",
        "ended_at": "2026-11-02T09:50:00Z",
        "duration_s": 3000,
        "status": "ended",
        "appointment_reference": None,
    }
    assert (rows[1]["status"], rows[1]["date"], rows[1]["duration_s"]) == (
        "created",
        "2026-11-07",
        None,
    )
    assert body["therapists"] == [
        {
            "therapist_id": str(month.people["anna"].account_id),
            "therapist": "anna@praktijk-noord.example",
            "therapist_external_id": None,
            "consults": 2,
            "held": 1,
            "duration_s": 3000,
        },
        {
            "therapist_id": str(month.people["bert"].account_id),
            "therapist": "bert@praktijk-noord.example",
            "therapist_external_id": None,
            "consults": 2,
            "held": 2,
            "duration_s": 25 * 60 + 10 * 60,
        },
    ]
    # Nothing of another practice, nothing of another month.
    text = await response.text()
    assert str(month["other_practice"]) not in text
    assert str(month["october"]) not in text


async def test_the_month_follows_the_time_zone_asked_for(harness: Harness) -> None:
    month = await a_month(harness)
    response = await harness.client.get("/api/admin/billing?month=2026-11&tz=Europe/Amsterdam")
    assert response.status == 200
    ids = [row["consult_id"] for row in (await response.json())["consults"]]
    assert str(month["bert_late"]) not in ids  # 1 December in Amsterdam
    december = await harness.client.get("/api/admin/billing?month=2026-12&tz=Europe/Amsterdam")
    [late] = (await december.json())["consults"]
    assert (late["consult_id"], late["date"]) == (str(month["bert_late"]), "2026-12-01")


async def test_the_csv_has_a_row_a_consult_and_one_therapist_can_be_chosen(
    harness: Harness,
) -> None:
    month = await a_month(harness)
    bert = month.people["bert"].account_id
    response = await harness.client.get(
        f"/api/admin/billing?month=2026-11&format=csv&therapist={bert}"
    )
    assert response.status == 200
    assert response.content_type == "text/csv"
    assert response.headers["Content-Disposition"] == 'attachment; filename="consults-2026-11.csv"'
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [row["consult_id"] for row in rows] == [str(month["bert_held"]), str(month["bert_late"])]
    assert rows[0]["duration_s"] == "1500"
    assert rows[0]["scheduled_at"] == ""
    assert set(rows[0]) == {
        "therapist_id",
        "therapist",
        "therapist_external_id",
        "consult_id",
        "date",
        "scheduled_at",
        "started_at",
        "ended_at",
        "duration_s",
        "status",
        "appointment_reference",
    }


async def test_the_excel_csv_is_the_same_month_for_a_bookkeeper(harness: Harness) -> None:
    month = await a_month(harness)
    response = await harness.client.get("/api/admin/billing?month=2026-11&format=excel")
    assert response.status == 200, await response.text()
    assert response.content_type == "text/csv"
    assert response.charset == "utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    assert (
        response.headers["Content-Disposition"]
        == 'attachment; filename="consults-2026-11-excel.csv"'
    )
    body = await response.read()
    assert body.startswith(b"\xef\xbb\xbftherapist_id;therapist;")
    rows = list(csv.DictReader(io.StringIO(body.decode("utf-8-sig")), delimiter=";"))
    assert [row["consult_id"] for row in rows] == [
        str(month[name]) for name in ("anna_held", "anna_unstarted", "bert_held", "bert_late")
    ]
    assert (rows[0]["date"], rows[0]["duration_s"]) == ("2026-11-02", "3000")


async def test_each_export_is_in_the_access_log(harness: Harness) -> None:
    month = await a_month(harness)
    queries = ("month=2026-11", "month=2026-11&format=csv", "month=2026-11&format=excel")
    for query in queries:
        assert (await harness.client.get(f"/api/admin/billing?{query}")).status == 200
    async with harness.app[DB_ENGINE].connect() as conn:
        rows = (
            await conn.execute(sa.select(access_log).where(access_log.c.action == "billing.export"))
        ).all()
    admin = month.people["admin"]
    assert [(row.actor_id, row.actor_role, row.object_type) for row in rows] == [
        (admin.account_id, "admin", "organisation"),
    ] * 3
    assert rows[0].object_id == str(admin.organisation.id)


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("", "parameter 'month' must be a month as YYYY-MM"),
        ("month=2026-13", "parameter 'month' must be a month as YYYY-MM"),
        ("month=11-2026", "parameter 'month' must be a month as YYYY-MM"),
        ("month=0000-01", "parameter 'month' must be a month from 2000-01 to 2999-12"),
        ("month=2026-11&tz=Mars/Olympus", "parameter 'tz' must be an IANA time zone"),
        ("month=2026-11&format=xlsx", "parameter 'format' must be json, csv or excel"),
        ("month=2026-11&format=CSV", "parameter 'format' must be json, csv or excel"),
        ("month=2026-11&therapist=anna", "parameter 'therapist' must be an account id"),
        ("month=2026-11&patient=x", "unknown parameter 'patient'"),
        ("month=2026-11&month=2026-10", "parameter 'month' is given more than once"),
    ],
)
@QUICK_ON_SQLITE
async def test_a_bad_query_is_named(harness: Harness, query: str, problem: str) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    response = await harness.client.get(f"/api/admin/billing?{query}")
    assert response.status == 422
    assert problem in (await response.json())["error"]["message"]


@pytest.mark.parametrize("role", [Role.THERAPIST, Role.SUPPORT])
async def test_only_an_admin_exports(harness: Harness, role: Role) -> None:
    someone = await harness.professional("someone@praktijk-noord.example", role)
    await harness.logged_in(someone)
    assert (await harness.client.get("/api/admin/billing?month=2026-11")).status == 403
    harness.client.session.cookie_jar.clear()
    assert (await harness.client.get("/api/admin/billing?month=2026-11")).status == 401


@pytest.mark.slow  # runs the command line in a process of its own
async def test_the_command_line_exports_the_same_month(
    harness: Harness, data_dir: Path, database_url: str
) -> None:
    month = await a_month(harness)
    env = cli_env(data_dir, **({"database_url": database_url} if database_url else {}))
    as_csv = await asyncio.to_thread(
        run_cli, "billing", "export", "--org", "Praktijk Noord", "--month", "2026-11", env=env
    )
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [row["consult_id"] for row in rows] == [
        str(month[name]) for name in ("anna_held", "anna_unstarted", "bert_held", "bert_late")
    ]
    for_excel = await asyncio.to_thread(
        run_cli,
        "billing",
        "export",
        "--org",
        "Praktijk Noord",
        "--month",
        "2026-11",
        "--format",
        "excel",
        env=env,
    )
    assert for_excel.returncode == 0, for_excel.stderr
    assert for_excel.stdout.startswith("\ufefftherapist_id;therapist;")
    excel_rows = list(csv.DictReader(io.StringIO(for_excel.stdout[1:]), delimiter=";"))
    assert [row["consult_id"] for row in excel_rows] == [row["consult_id"] for row in rows]
    as_json = await asyncio.to_thread(
        run_cli,
        "billing",
        "export",
        "--org",
        "Praktijk Noord",
        "--month",
        "2026-12",
        "--tz",
        "Europe/Amsterdam",
        "--format",
        "json",
        env=env,
    )
    assert as_json.returncode == 0, as_json.stderr
    assert [row["consult_id"] for row in json.loads(as_json.stdout)["consults"]] == [
        str(month["bert_late"])
    ]
    wrong = await asyncio.to_thread(
        run_cli, "billing", "export", "--org", "Praktijk Noord", "--month", "2026-1", env=env
    )
    assert wrong.returncode == 1
    assert "--month must be a month as YYYY-MM" in wrong.stderr
    async with harness.app[DB_ENGINE].connect() as conn:
        operator_reads = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(access_log)
            .where(access_log.c.action == "billing.export", access_log.c.actor_role == "operator")
        )
    assert operator_reads == 3
