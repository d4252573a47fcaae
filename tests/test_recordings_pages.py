"""The therapist's recordings list, a page at a time (``GET /api/recordings``
with ``limit`` and ``before``): every recording once, in the list's order,
ties in time included; bad parameters refused by name; each page read in the
access log."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from audit.schema import access_log, recordings
from server.app_keys import DB_ENGINE
from tests.support.harness import Harness, new_consult, stored_recording


async def _recordings(harness: Harness, count: int) -> list[uuid.UUID]:
    """A therapist (logged in) with ``count`` recordings of one consult."""
    setup = await new_consult(harness)
    return [await stored_recording(harness, setup.consult_id, b"media") for _ in range(count)]


async def _page(harness: Harness, query: str = "") -> dict[str, Any]:
    response = await harness.client.get("/api/recordings" + query)
    assert response.status == 200, await response.text()
    page: dict[str, Any] = await response.json()
    return page


async def _pages(harness: Harness, limit: int) -> list[list[str]]:
    """Every page from the first, following ``next_before``."""
    pages, query = [], f"?limit={limit}"
    while True:
        page = await _page(harness, query)
        pages.append([entry["id"] for entry in page["recordings"]])
        if page["next_before"] is None:
            return pages
        assert page["next_before"] == pages[-1][-1]
        query = f"?limit={limit}&before={page['next_before']}"


async def test_the_pages_hold_every_recording_once_in_the_lists_order(harness: Harness) -> None:
    made = await _recordings(harness, 7)
    # Three recordings started in the same microsecond: the id orders them.
    async with harness.app[DB_ENGINE].begin() as conn:
        same = (await conn.execute(sa.select(recordings.c.created_at))).scalars().first()
        await conn.execute(
            recordings.update().where(recordings.c.id.in_(made[2:5])).values(created_at=same)
        )
    whole = await _page(harness)
    assert whole["next_before"] is None
    everything = [entry["id"] for entry in whole["recordings"]]
    assert sorted(everything) == sorted(str(recording) for recording in made)
    # Newest first, and among equal times by id.
    times = [entry["created_at"] for entry in whole["recordings"]]
    assert times == sorted(times, reverse=True)

    pages = await _pages(harness, 3)
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [recording for page in pages for recording in page] == everything
    for limit in (1, 2, 4, 7):
        assert [r for page in await _pages(harness, limit) for r in page] == everything
    # A page that holds exactly the rest is the last one.
    assert (await _page(harness, "?limit=7"))["next_before"] is None
    assert (await _page(harness, "?limit=6"))["next_before"] == everything[5]


async def test_every_page_read_is_in_the_access_log(harness: Harness) -> None:
    await _recordings(harness, 3)
    await _pages(harness, 1)
    async with harness.app[DB_ENGINE].connect() as conn:
        reads = (
            await conn.execute(
                sa.select(sa.func.count()).where(access_log.c.action == "recording.list")
            )
        ).scalar_one()
    assert reads == 3


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("?limit=0", "parameter 'limit' must be a whole number from 1 to 100"),
        ("?limit=101", "parameter 'limit' must be a whole number from 1 to 100"),
        ("?limit=ten", "parameter 'limit' must be a whole number from 1 to 100"),
        ("?before=yesterday", "parameter 'before' must be a recording's id"),
        (
            "?before=5f0c1c4e-6a43-4d1e-9a55-0c5d9b1e2f37",
            "parameter 'before' must be the id of one of your recordings",
        ),
        ("?page=2", "unknown parameter 'page' (expected: before, limit)"),
        ("?limit=2&limit=3", "parameter 'limit' is given more than once"),
    ],
)
async def test_a_bad_parameter_is_refused_by_name(harness: Harness, query: str, named: str) -> None:
    await _recordings(harness, 2)
    response = await harness.client.get("/api/recordings" + query)
    assert response.status == 422, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "invalid_field"
    assert error["message"].startswith(named), error["message"]


async def test_another_therapists_recording_is_no_cursor(harness: Harness) -> None:
    """Refused exactly as an id that does not exist: the answer tells nobody
    whether another practice's recording is there."""
    (theirs,) = await _recordings(harness, 1)
    setup = await new_consult(harness, "other@praktijk-zuid.example")
    await stored_recording(harness, setup.consult_id, b"media")
    answers = []
    for cursor in (theirs, uuid.uuid4()):
        response = await harness.client.get(f"/api/recordings?before={cursor}")
        assert response.status == 422, await response.text()
        answers.append((await response.json())["error"])
    assert answers[0] == answers[1]


async def test_a_deleted_cursor_asks_for_the_list_again(harness: Harness) -> None:
    made = await _recordings(harness, 3)
    first = await _page(harness, "?limit=1")
    assert first["next_before"] == str(made[-1])
    response = await harness.client.delete(f"/api/recordings/{made[-1]}", headers=harness.headers)
    assert response.status == 204, await response.text()
    response = await harness.client.get(f"/api/recordings?before={first['next_before']}")
    assert response.status == 422, await response.text()
    assert "load the list again" in (await response.json())["error"]["message"]
