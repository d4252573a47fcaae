"""The support view's API: pseudonymous consult metadata of the own organisation
only, filters and pages, two SVG charts, the 24-hour technical log of a
consult; refusals for other roles, and every read in the access log."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from audit.access_log import Outcome
from audit.consults import create_consult, mark_ended, mark_started
from audit.roles import Role
from audit.schema import access_log, technical_log
from audit.support import DurationBucket, duration_histogram
from audit.technical_log import write_technical
from server.api.support_charts import Bar, bar_chart
from server.app_keys import DB_ENGINE, TECHNICAL_LOG
from tests.support.harness import Harness, Professional, new_consult

SVG = "{http://www.w3.org/2000/svg}"
NORTH, SOUTH = "Praktijk Noord", "Praktijk Zuid"
CONSULTS = "/api/support/consults"
PER_DAY = "/api/support/charts/consults-per-day.svg"
DURATIONS = "/api/support/charts/durations.svg"


async def consult(
    harness: Harness,
    therapist: Professional,
    *,
    at: datetime,
    minutes: float | None = None,
    start: bool = True,
) -> str:
    """A consult made at ``at``: started two minutes later and ended after
    ``minutes`` (if given), or never started (``start=False``, then closed)."""
    async with harness.app[DB_ENGINE].begin() as conn:
        made = await create_consult(conn, therapist_id=therapist.account_id, now=at)
        if start:
            await mark_started(conn, made.id, now=at + timedelta(minutes=2))
            if minutes is not None:
                ended_at = at + timedelta(minutes=2 + minutes)
                await mark_ended(conn, made.id, now=ended_at)
        else:
            await mark_ended(conn, made.id, now=at + timedelta(hours=1))
    return str(made.id)


async def support_user(harness: Harness, organisation: str = NORTH) -> Professional:
    domain = organisation.lower().replace(" ", "-")
    return await harness.professional(f"sam@{domain}.example", Role.SUPPORT, organisation)


async def get_json(harness: Harness, path: str, **params: Any) -> Any:
    response = await harness.client.get(path, params=params)
    assert response.status == 200, await response.text()
    return await response.json()


async def get_svg(harness: Harness, path: str, **params: Any) -> ET.Element:
    response = await harness.client.get(path, params=params)
    assert response.status == 200, await response.text()
    assert response.content_type == "image/svg+xml"
    return ET.fromstring(await response.text())  # noqa: S314 - our own server's SVG


def bars(svg: ET.Element) -> list[ET.Element]:
    return [rect for rect in svg.iter(f"{SVG}rect") if rect.get("class") == "bar"]


async def access_records(harness: Harness) -> list[Any]:
    async with harness.app[DB_ENGINE].connect() as conn:
        return list((await conn.execute(sa.select(access_log).order_by(access_log.c.seq))).all())


@pytest.fixture
def now(harness: Harness) -> datetime:
    return harness.clock.now()


async def test_support_sees_consults_with_times_status_and_a_pseudonym_only(
    harness: Harness,
) -> None:
    setup = await new_consult(harness, display_name="Mevr. Jansen")
    anna = setup.therapist
    bram = await harness.professional("bram@praktijk-noord.example", Role.THERAPIST)
    day = harness.clock.now() - timedelta(days=1)
    ended = await consult(harness, anna, at=day, minutes=25)
    await consult(harness, bram, at=day + timedelta(hours=1), minutes=40)
    sam = await support_user(harness)
    await harness.logged_in(sam)

    first = await get_json(harness, CONSULTS)
    again = await get_json(harness, CONSULTS)
    assert first["consults"] == again["consults"]  # pseudonyms are stable
    assert first["total"] == 3
    [shown] = [c for c in first["consults"] if c["id"] == ended]
    assert set(shown) == {
        "id",
        "status",
        "created_at",
        "started_at",
        "ended_at",
        "duration_s",
        "therapist",
        "end_reason",
    }
    assert shown["status"] == "ended"
    assert shown["duration_s"] == 25 * 60
    assert shown["started_at"] == (day + timedelta(minutes=2)).isoformat()
    pseudonyms = {c["therapist"] for c in first["consults"]}
    assert len(pseudonyms) == 2
    assert sorted(pseudonyms) == first["therapists"]
    assert all(name.startswith("T-") and len(name) == 14 for name in pseudonyms)
    text = await (await harness.client.get(CONSULTS)).text()
    for secret in (
        str(anna.account_id),
        str(bram.account_id),
        anna.email,
        bram.email,
        "Jansen",
        setup.invite_token,
    ):
        assert secret not in text


async def test_the_list_says_how_a_consult_ended_while_the_technical_log_holds_it(
    harness: Harness, now: datetime
) -> None:
    # Ended by its therapist through the API: the end goes into the technical log.
    setup = await new_consult(harness)
    anna = setup.therapist
    harness.clock.advance(60)
    response = await harness.post(f"/api/consults/{setup.consult_id}/end", {})
    assert response.status == 200, await response.text()
    await harness.app[TECHNICAL_LOG].flush(harness.app[DB_ENGINE])
    both_left = await consult(harness, anna, at=now - timedelta(hours=3), minutes=40)
    maximum = await consult(harness, anna, at=now - timedelta(hours=5), minutes=60)
    unused = await consult(harness, anna, at=now - timedelta(hours=6), start=False)
    # Ended two days ago: its technical-log entry is past 24 hours (not purged yet).
    old = await consult(harness, anna, at=now - timedelta(days=2), minutes=25)
    running = await consult(harness, anna, at=now - timedelta(minutes=10))
    odd = await consult(harness, anna, at=now - timedelta(hours=7), minutes=5)
    entries = [
        (both_left, now - timedelta(hours=2), {"reason": "both_left"}),
        (maximum, now - timedelta(hours=4), {"reason": "max_duration"}),
        (unused, now - timedelta(hours=5), {"reason": "not_joined"}),
        (old, now - timedelta(days=2), {"reason": "both_left"}),
        (odd, now - timedelta(hours=6), {"reason": "no such reason"}),
    ]
    async with harness.app[DB_ENGINE].begin() as conn:
        for subject, at, detail in entries:
            await write_technical(
                conn, "signaling.consult-ended", now=at, subject=subject, detail=detail
            )
        # Another kind of entry says nothing about the end.
        await write_technical(
            conn, "signaling.connected", now=now, subject=running, detail={"reason": "both_left"}
        )
    sam = await support_user(harness)
    await harness.logged_in(sam)

    listed = await get_json(harness, CONSULTS)
    reasons = {c["id"]: (c["status"], c["end_reason"]) for c in listed["consults"]}
    assert reasons == {
        setup.consult_id: ("not_started", "ended_by_therapist"),
        both_left: ("ended", "both_left"),
        maximum: ("ended", "max_duration"),
        unused: ("not_started", "not_joined"),
        old: ("ended", None),
        running: ("active", None),
        odd: ("ended", None),
    }


async def test_filters_by_status_therapist_and_date_range(harness: Harness, now: datetime) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    bram = await harness.professional("bram@praktijk-noord.example", Role.THERAPIST)
    long_ago = await consult(harness, anna, at=now - timedelta(days=40), minutes=30)
    annas = await consult(harness, anna, at=now - timedelta(days=3), minutes=12)
    never = await consult(harness, anna, at=now - timedelta(days=2), start=False)
    brams = await consult(harness, bram, at=now - timedelta(days=1), minutes=50)
    sam = await support_user(harness)
    await harness.logged_in(sam)

    default = await get_json(harness, CONSULTS)
    assert {c["id"] for c in default["consults"]} == {annas, never, brams}  # the last 30 days
    assert default["filters"]["to"] == now.date().isoformat()
    assert default["filters"]["from"] == (now - timedelta(days=29)).date().isoformat()

    ended = await get_json(harness, CONSULTS, status="ended")
    assert [c["id"] for c in ended["consults"]] == [brams, annas]
    assert (await get_json(harness, CONSULTS, status="not_started"))["total"] == 1

    bram_name = next(c["therapist"] for c in default["consults"] if c["id"] == brams)
    only_bram = await get_json(harness, CONSULTS, therapist=bram_name)
    assert [c["id"] for c in only_bram["consults"]] == [brams]
    nobody = await get_json(harness, CONSULTS, therapist="T-000000000000")
    assert nobody["consults"] == []
    assert nobody["total"] == 0

    old = (now - timedelta(days=40)).date().isoformat()
    everything = await get_json(harness, CONSULTS, **{"from": old})
    assert {c["id"] for c in everything["consults"]} == {long_ago, annas, never, brams}
    that_day = await get_json(harness, CONSULTS, **{"from": old, "to": old})
    assert [c["id"] for c in that_day["consults"]] == [long_ago]


async def test_days_are_counted_in_the_requested_time_zone(harness: Harness) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    # 23:30 UTC on 20 November is 00:30 on 21 November in Amsterdam (UTC+1).
    late = await consult(harness, anna, at=datetime(2026, 11, 20, 23, 28, tzinfo=UTC), minutes=5)
    sam = await support_user(harness)
    await harness.logged_in(sam)
    day = {"from": "2026-11-21", "to": "2026-11-21"}
    in_utc = await get_json(harness, CONSULTS, **day)
    in_amsterdam = await get_json(harness, CONSULTS, tz="Europe/Amsterdam", **day)
    assert in_utc["consults"] == []
    assert [c["id"] for c in in_amsterdam["consults"]] == [late]
    assert in_amsterdam["filters"]["tz"] == "Europe/Amsterdam"
    chart = await get_svg(harness, PER_DAY, tz="Europe/Amsterdam", **day)
    [bar] = bars(chart)
    assert float(bar.get("height", "0")) > 0


async def test_pages_cover_every_consult_once_newest_first(harness: Harness, now: datetime) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    made = [
        await consult(harness, anna, at=now - timedelta(days=1, hours=hours), minutes=10)
        for hours in range(7)
    ]
    sam = await support_user(harness)
    await harness.logged_in(sam)
    pages = [await get_json(harness, CONSULTS, per_page=3, page=page) for page in (1, 2, 3, 4)]
    assert [len(page["consults"]) for page in pages] == [3, 3, 1, 0]
    assert all(page["total"] == 7 and page["pages"] == 3 for page in pages)
    seen = [c["id"] for page in pages for c in page["consults"]]
    assert seen == made  # made at 0, 1, 2... hours before: newest first
    assert pages[0]["per_page"] == 3
    assert (await get_json(harness, CONSULTS))["per_page"] == 25


async def test_support_of_another_organisation_sees_nothing_of_it(
    harness: Harness, now: datetime
) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    north_consult = await consult(harness, anna, at=now - timedelta(hours=3), minutes=20)
    async with harness.app[DB_ENGINE].begin() as conn:
        await write_technical(
            conn, "ice-state", now=now, subject=north_consult, detail={"state": "failed"}
        )
    south = await support_user(harness, SOUTH)
    await harness.logged_in(south)

    listing = await get_json(harness, CONSULTS)
    assert listing["consults"] == []
    assert listing["total"] == 0
    assert listing["therapists"] == []
    assert sum(float(bar.get("height", "0")) for bar in bars(await get_svg(harness, PER_DAY))) == 0
    assert sum(float(b.get("height", "0")) for b in bars(await get_svg(harness, DURATIONS))) == 0
    log = await harness.client.get(f"{CONSULTS}/{north_consult}/technical-log")
    assert log.status == 404
    assert "failed" not in await log.text()
    last = (await access_records(harness))[-1]
    assert (last.action, last.outcome, last.object_id) == (
        "support.technical_log.read",
        "refused",
        north_consult,
    )
    assert last.organisation_id == south.organisation.id


SUPPORT_ROUTES = [
    (CONSULTS, "support.consult.list"),
    (PER_DAY, "support.chart.consults_per_day"),
    (DURATIONS, "support.chart.durations"),
    (f"{CONSULTS}/{uuid.uuid4()}/technical-log", "support.technical_log.read"),
]


@pytest.mark.parametrize("role", [Role.THERAPIST, Role.ADMIN])
async def test_therapists_and_admins_are_refused_and_the_refusal_is_logged(
    harness: Harness, role: Role
) -> None:
    who = await harness.professional(f"{role.value}@praktijk-noord.example", role)
    await harness.logged_in(who)
    for path, action in SUPPORT_ROUTES:
        response = await harness.client.get(path)
        assert response.status == 403, path
        assert (await response.json())["error"]["code"] == "forbidden"
        last = (await access_records(harness))[-1]
        assert (last.action, last.outcome, last.actor_role, last.actor_id) == (
            action,
            Outcome.REFUSED.value,
            role.value,
            who.account_id,
        )


async def test_without_a_session_every_route_answers_401(sqlite_harness: Harness) -> None:
    for path, _action in SUPPORT_ROUTES:
        assert (await sqlite_harness.client.get(path)).status == 401


async def test_every_read_writes_one_access_log_record(harness: Harness, now: datetime) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    consult_id = await consult(harness, anna, at=now - timedelta(hours=2), minutes=15)
    sam = await support_user(harness)
    await harness.logged_in(sam)
    reads = [
        (CONSULTS, "support.consult.list", "organisation", str(sam.organisation.id)),
        (PER_DAY, "support.chart.consults_per_day", "organisation", str(sam.organisation.id)),
        (DURATIONS, "support.chart.durations", "organisation", str(sam.organisation.id)),
        (
            f"{CONSULTS}/{consult_id}/technical-log",
            "support.technical_log.read",
            "consult",
            consult_id,
        ),
    ]
    for path, action, object_type, object_id in reads:
        before = len(await access_records(harness))
        response = await harness.client.get(path)
        assert response.status == 200, await response.text()
        records = await access_records(harness)
        assert len(records) == before + 1, path
        record = records[-1]
        assert (record.action, record.object_type, record.object_id) == (
            action,
            object_type,
            object_id,
        )
        assert (record.outcome, record.actor_role, record.client_type) == (
            "allowed",
            "support",
            "api",
        )
        assert record.actor_id == sam.account_id


@pytest.mark.parametrize(
    ("path", "params", "named"),
    [
        (CONSULTS, {"from": "2026-13-01"}, "'from'"),
        (CONSULTS, {"from": "yesterday"}, "'from'"),
        (CONSULTS, {"to": "20261123"}, "'to'"),
        (CONSULTS, {"from": "1999-12-31"}, "'from'"),
        (CONSULTS, {"from": "2026-11-23", "to": "2026-11-01"}, "'from'"),
        (CONSULTS, {"status": "finished"}, "'status'"),
        (CONSULTS, {"therapist": "anna@praktijk-noord.example"}, "'therapist'"),
        (CONSULTS, {"therapist": "t-4f2a91c03b7e"}, "'therapist'"),
        (CONSULTS, {"page": "0"}, "'page'"),
        (CONSULTS, {"page": "two"}, "'page'"),
        (CONSULTS, {"per_page": "101"}, "'per_page'"),
        (CONSULTS, {"per_page": "-1"}, "'per_page'"),
        (CONSULTS, {"tz": "Mars/Olympus_Mons"}, "'tz'"),
        (CONSULTS, {"tz": "../../etc/passwd"}, "'tz'"),
        (CONSULTS, {"email": "anna@praktijk-noord.example"}, "'email'"),
        (CONSULTS, {"lang": "nl"}, "'lang'"),
        (PER_DAY, {"from": "2025-01-01", "to": "2026-11-23"}, "'from' and 'to'"),
        (PER_DAY, {"lang": "fr"}, "'lang'"),
        (PER_DAY, {"page": "2"}, "'page'"),
        (DURATIONS, {"status": "ENDED"}, "'status'"),
        # A fixed id: pytest-xdist's workers must collect the same test names.
        (
            f"{CONSULTS}/7f0c2d4e-5b1a-4c3d-9e8f-a1b2c3d4e5f6/technical-log",
            {"since": "2026-11-01"},
            "'since'",
        ),
    ],
)
async def test_bad_parameters_answer_422_naming_the_parameter(
    sqlite_harness: Harness, path: str, params: dict[str, str], named: str
) -> None:
    sam = await support_user(sqlite_harness)
    await sqlite_harness.logged_in(sam)
    response = await sqlite_harness.client.get(path, params=params)
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["code"] == "invalid_field"
    assert named in error["message"]


async def test_a_repeated_parameter_answers_422(sqlite_harness: Harness) -> None:
    sam = await support_user(sqlite_harness)
    await sqlite_harness.logged_in(sam)
    response = await sqlite_harness.client.get(f"{CONSULTS}?status=ended&status=active")
    assert response.status == 422
    assert "'status' is given more than once" in (await response.json())["error"]["message"]


async def test_the_technical_log_shows_only_the_last_24_hours(harness: Harness) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    start = harness.clock.now()
    consult_id = await consult(harness, anna, at=start - timedelta(minutes=10), minutes=5)
    other = await consult(harness, anna, at=start - timedelta(minutes=30), minutes=5)
    async with harness.app[DB_ENGINE].begin() as conn:
        await write_technical(
            conn,
            "camera-error",
            now=start,
            subject=consult_id,
            detail={"role": "patient", "error": "NotReadableError"},
        )
        await write_technical(conn, "ice-state", now=start, subject=other, detail={})
    sam = await support_user(harness)
    path = f"{CONSULTS}/{consult_id}/technical-log"

    harness.clock.advance(24 * 3600 - 90)
    await harness.logged_in(sam)  # a day later: log in again (advances 30 s)
    shown = await get_json(harness, path)
    assert [(e["kind"], e["detail"]) for e in shown["entries"]] == [
        ("camera-error", {"role": "patient", "error": "NotReadableError"})
    ]
    assert shown["consult"]["id"] == consult_id
    assert shown["since"] == (harness.clock.now() - timedelta(hours=24)).isoformat()

    harness.clock.advance(61)  # 24 h and 1 s after the entry; the purge has not run
    assert (await get_json(harness, path))["entries"] == []
    async with harness.app[DB_ENGINE].connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(technical_log)) == 2


async def test_the_technical_log_hides_anything_that_could_name_a_person(
    harness: Harness, now: datetime
) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    consult_id = await consult(harness, anna, at=now - timedelta(minutes=20))
    async with harness.app[DB_ENGINE].begin() as conn:
        await write_technical(
            conn,
            "signaling.connected",
            now=now,
            subject=consult_id,
            detail={
                "role": "patient",
                "client_address": "192.0.2.7",
                "user_agent": "Mozilla/5.0",
                "display_name": "Mevr. Jansen",
                "invite_token": "abc",
                "error": "mail anna@praktijk-noord.example failed",
                "detail": {"name": "NotReadableError", "patientName": "J.", "email": "x@y.nl"},
                # What names a patient in this project's own words (a review
                # found them let through).
                "label": "Jan Jansen",
                "appointmentReference": "APPT-1",
                "external_id": "EXT-1",
            },
        )
    sam = await support_user(harness)
    await harness.logged_in(sam)
    [entry] = (await get_json(harness, f"{CONSULTS}/{consult_id}/technical-log"))["entries"]
    assert entry["detail"] == {
        "role": "patient",
        "client_address": "192.0.2.7",
        "user_agent": "Mozilla/5.0",
        "display_name": "[hidden]",
        "invite_token": "[hidden]",
        "error": "mail [hidden] failed",
        "detail": {"name": "NotReadableError", "patientName": "[hidden]", "email": "[hidden]"},
        "label": "[hidden]",
        "appointmentReference": "[hidden]",
        "external_id": "[hidden]",
    }


async def test_unknown_and_malformed_consult_ids_answer_404(sqlite_harness: Harness) -> None:
    sam = await support_user(sqlite_harness)
    await sqlite_harness.logged_in(sam)
    for consult_id in ("not-a-uuid", str(uuid.uuid4())):
        response = await sqlite_harness.client.get(f"{CONSULTS}/{consult_id}/technical-log")
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"


async def test_the_per_day_chart_is_svg_with_a_bar_per_day(harness: Harness, now: datetime) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    for hours in (1, 3, 5):  # three on the busiest day, one two days earlier
        await consult(harness, anna, at=now - timedelta(days=1, hours=hours), minutes=10)
    await consult(harness, anna, at=now - timedelta(days=3), minutes=10)
    sam = await support_user(harness)
    await harness.logged_in(sam)

    default = await get_svg(harness, PER_DAY)
    assert default.tag == f"{SVG}svg"
    assert len(bars(default)) == 30
    week = {
        "from": (now - timedelta(days=6)).date().isoformat(),
        "to": now.date().isoformat(),
    }
    svg = await get_svg(harness, PER_DAY, **week)
    drawn = bars(svg)
    assert len(drawn) == 7
    heights = [float(bar.get("height", "0")) for bar in drawn]
    assert heights.index(max(heights)) == 5  # yesterday
    assert heights[3] == pytest.approx(max(heights) / 3, abs=0.1)  # one, three days ago
    assert [heights[i] for i in (0, 1, 2, 4, 6)] == [0] * 5
    title = svg.find(f"{SVG}title")
    desc = svg.find(f"{SVG}desc")
    assert title is not None
    assert title.text == "Consults per day"
    assert desc is not None
    assert desc.text is not None
    assert "4 consults" in desc.text
    assert svg.get("role") == "img"
    assert not list(svg.iter(f"{SVG}script"))
    dutch = await get_svg(harness, PER_DAY, lang="nl", **week)
    dutch_title = dutch.find(f"{SVG}title")
    assert dutch_title is not None
    assert dutch_title.text == "Consulten per dag"


async def test_the_duration_chart_counts_ended_consults_into_buckets(
    harness: Harness, now: datetime
) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    for minutes in (1, 22, 25, 28, 75):
        await consult(harness, anna, at=now - timedelta(days=2, minutes=minutes), minutes=minutes)
    await consult(harness, anna, at=now - timedelta(days=2), start=False)
    sam = await support_user(harness)
    await harness.logged_in(sam)
    svg = await get_svg(harness, DURATIONS)
    drawn = bars(svg)
    assert len(drawn) == 8
    counts = [
        int(title.text.split(": ")[1].split()[0])
        for bar in drawn
        if (title := bar.find(f"{SVG}title")) is not None and title.text
    ]
    assert counts == [1, 0, 0, 0, 3, 0, 0, 1]
    desc = svg.find(f"{SVG}desc")
    assert desc is not None
    assert desc.text is not None
    assert "5 consults" in desc.text


def test_the_duration_buckets_have_no_gaps() -> None:
    buckets = duration_histogram([0, 299, 300, 3599, 3600, 10**6])
    assert buckets[0] == DurationBucket(0, 5, 2)
    assert buckets[1] == DurationBucket(5, 10, 1)
    assert buckets[-2] == DurationBucket(45, 60, 1)
    assert buckets[-1] == DurationBucket(60, None, 2)
    assert sum(bucket.count for bucket in buckets) == 6


def test_chart_text_cannot_inject_markup() -> None:
    hostile = '</title><script>alert(1)</script><a href="x" onclick="y">'
    svg = ET.fromstring(  # noqa: S314 - our own renderer's SVG
        bar_chart(
            title=hostile,
            description=hostile,
            bars=[Bar(3, hostile, hostile)],
            y_caption=hostile,
            x_caption=hostile,
        )
    )
    assert not list(svg.iter(f"{SVG}script"))
    assert not list(svg.iter(f"{SVG}a"))
    title = svg.find(f"{SVG}title")
    assert title is not None
    assert title.text == hostile
    assert not [el for el in svg.iter() if any(name.startswith("on") for name in el.attrib)]


async def test_the_support_page_is_served_with_the_strict_policy(sqlite_harness: Harness) -> None:
    response = await sqlite_harness.client.get("/support")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    assert '<script type="module" src="/static/js/support.js">' in await response.text()
