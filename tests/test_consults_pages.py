"""The therapist's consults list, a page at a time (``GET /api/consults`` with
``limit`` and ``before``), in the order of each consult's time (its
appointment, else when it was made), latest first: every consult reachable,
however many were made after it; bad parameters refused by name; each page
read in the access log."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from audit.schema import access_log, consults
from server.app_keys import DB_ENGINE
from tests.support.harness import Harness, new_consult


async def _made(harness: Harness, count: int, **body: Any) -> list[str]:
    """``count`` more consults of the logged-in therapist, one second apart."""
    made = []
    for _ in range(count):
        harness.clock.advance(1)
        response = await harness.post("/api/consults", body)
        assert response.status == 201, await response.text()
        made.append((await response.json())["consult"]["id"])
    return made


async def _page(harness: Harness, query: str = "") -> dict[str, Any]:
    response = await harness.client.get("/api/consults" + query)
    assert response.status == 200, await response.text()
    page: dict[str, Any] = await response.json()
    return page


async def _pages(harness: Harness, limit: int | None = None) -> list[list[str]]:
    """Every page from the first, following ``next_before``."""
    pages, size = [], "" if limit is None else f"limit={limit}"
    query = "?" + size if size else ""
    while True:
        page = await _page(harness, query)
        pages.append([consult["id"] for consult in page["consults"]])
        if page["next_before"] is None:
            return pages
        assert page["next_before"] == pages[-1][-1]
        query = "?" + "&".join(filter(None, [size, f"before={page['next_before']}"]))


def _time(consult: dict[str, Any]) -> str:
    return str(consult["scheduled_at"] or consult["created_at"])


async def test_todays_appointment_booked_before_a_hundred_others_is_still_listed(
    harness: Harness,
) -> None:
    """A practice that books weeks ahead: the appointment made first is today's,
    and a hundred consults were made after it. The list used to be the 100
    made last, and today's appointment was not in it at all."""
    start = harness.clock.now()
    setup = await new_consult(
        harness, scheduled_at=(start + timedelta(minutes=5)).isoformat(), display_name="Mrs B."
    )
    harness.clock.advance(6 * 60)  # the appointment's time has come
    later = await _made(harness, 100)
    pages = await _pages(harness)
    assert [len(page) for page in pages] == [100, 1]
    listed = [consult for page in pages for consult in page]
    assert listed == [*reversed(later), setup.consult_id]


async def test_the_pages_hold_every_consult_once_in_the_lists_order(harness: Harness) -> None:
    await new_consult(harness)
    made = await _made(harness, 3)
    start = harness.clock.now()
    # Appointments: one next week (first in the list), one an hour ago
    # (between the consults made before and after it).
    soon = await _made(harness, 1, scheduled_at=(start + timedelta(days=7)).isoformat())
    past = await _made(harness, 1, scheduled_at=(start - timedelta(seconds=2)).isoformat())
    made += await _made(harness, 2)
    # Three consults made in the same microsecond: the id orders them.
    async with harness.app[DB_ENGINE].begin() as conn:
        same = (
            (await conn.execute(sa.select(consults.c.created_at).order_by(consults.c.created_at)))
            .scalars()
            .first()
        )
        await conn.execute(
            consults.update()
            .where(consults.c.id.in_([uuid.UUID(c) for c in made[:3]]))
            .values(created_at=same)
        )
    whole = await _page(harness)
    assert whole["next_before"] is None
    everything = [consult["id"] for consult in whole["consults"]]
    assert len(everything) == 8
    assert everything[0] == soon[0]
    times = [_time(consult) for consult in whole["consults"]]
    assert times == sorted(times, reverse=True)
    tied = [consult["id"] for consult in whole["consults"] if _time(consult) == times[-1]]
    # The first consult and the three made in its microsecond, last.
    assert len(tied) == 4
    assert tied == sorted(tied)
    # After next week's appointment and the two made last: its time is
    # before theirs, and after the four made earlier than it.
    assert everything.index(past[0]) == 3

    pages = await _pages(harness, 3)
    assert [len(page) for page in pages] == [3, 3, 2]
    assert [consult for page in pages for consult in page] == everything
    for limit in (1, 2, 4, 7, 8):
        assert [c for page in await _pages(harness, limit) for c in page] == everything
    # A page that holds exactly the rest is the last one.
    assert (await _page(harness, "?limit=8"))["next_before"] is None
    assert (await _page(harness, "?limit=7"))["next_before"] == everything[6]


async def test_every_page_read_is_in_the_access_log_with_the_labels_it_shows(
    harness: Harness,
) -> None:
    await new_consult(harness, display_name="Mrs B.")
    await _made(harness, 2)
    assert [len(page) for page in await _pages(harness, 1)] == [1, 1, 1]
    async with harness.app[DB_ENGINE].connect() as conn:
        rows = (
            await conn.execute(
                sa.select(access_log.c.object_type, sa.func.count())
                .where(access_log.c.action == "consult.list")
                .group_by(access_log.c.object_type)
            )
        ).all()
    # Three pages read; the one label shown, once, on the page that showed it.
    assert dict(rows) == {"therapist": 3, "consult": 1}


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("?limit=0", "parameter 'limit' must be a whole number from 1 to 100"),
        ("?limit=101", "parameter 'limit' must be a whole number from 1 to 100"),
        ("?limit=ten", "parameter 'limit' must be a whole number from 1 to 100"),
        ("?before=yesterday", "parameter 'before' must be a consult's id"),
        ("?before=" + "5f0c1c4e" * 8, "parameter 'before' must be a consult's id"),
        (
            "?before=5f0c1c4e-6a43-4d1e-9a55-0c5d9b1e2f37",
            "parameter 'before' must be the id of one of your consults",
        ),
        ("?page=2", "unknown parameter 'page' (expected: before, limit)"),
        ("?limit=2&limit=3", "parameter 'limit' is given more than once"),
    ],
)
async def test_a_bad_parameter_is_refused_by_name(harness: Harness, query: str, named: str) -> None:
    await new_consult(harness)
    response = await harness.client.get("/api/consults" + query)
    assert response.status == 422, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "invalid_field"
    assert error["message"].startswith(named), error["message"]


async def test_another_therapists_consult_is_no_cursor_and_the_attempt_is_logged(
    harness: Harness,
) -> None:
    """Refused exactly as an id that does not exist (the answer tells nobody
    whether another practice's consult is there), and the attempt is in the
    access log, naming the consult asked for."""
    theirs = await new_consult(harness)
    await new_consult(harness, "other@praktijk-zuid.example")
    cursors = [theirs.consult_id, str(uuid.uuid4())]
    answers = []
    for cursor in cursors:
        response = await harness.client.get(f"/api/consults?before={cursor}")
        assert response.status == 422, await response.text()
        answers.append((await response.json())["error"])
    assert answers[0] == answers[1]
    async with harness.app[DB_ENGINE].connect() as conn:
        refused = (
            await conn.execute(
                sa.select(access_log.c.object_type, access_log.c.object_id).where(
                    access_log.c.action == "consult.list", access_log.c.outcome == "refused"
                )
            )
        ).all()
    assert sorted((kind, str(object_id)) for kind, object_id in refused) == sorted(
        ("consult", cursor) for cursor in cursors
    )
