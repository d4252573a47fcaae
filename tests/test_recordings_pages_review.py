"""Review of the paged recordings list (``GET /api/recordings`` with
``before``, and the dashboard's "Older recordings"): what it gets wrong.

- A ``before`` naming another therapist's recording (or none) is refused
  with 422 but, unlike every other refusal in server/api/recording_views.py
  (and the other views' refusals of an id that is not the caller's), not
  written to the access log, although docs/recording.md says every list and
  refusal is.

The review's two findings in the dashboard are in
tests/test_browser_recordings_pages.py.
"""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from audit.schema import access_log
from server.app_keys import DB_ENGINE
from tests.support.harness import Harness, new_consult, stored_recording


async def _refused_list_reads(harness: Harness, actor: uuid.UUID) -> int:
    async with harness.app[DB_ENGINE].connect() as conn:
        count: int = (
            await conn.execute(
                sa.select(sa.func.count()).where(
                    access_log.c.action == "recording.list",
                    access_log.c.actor_id == actor,
                    access_log.c.outcome == "refused",
                )
            )
        ).scalar_one()
    return count


@pytest.mark.parametrize("whose", ["another therapist's", "none"])
async def test_a_before_that_is_not_the_callers_recording_is_a_logged_refusal(
    harness: Harness, whose: str
) -> None:
    """As a download of another therapist's recording is logged refused, so
    is a page asked for after it: the attempt names that recording."""
    owner = await new_consult(harness)
    theirs = await stored_recording(harness, owner.consult_id, b"media")
    other = await new_consult(harness, "other@praktijk-noord.example")
    await stored_recording(harness, other.consult_id, b"media")
    cursor = theirs if whose != "none" else uuid.uuid4()
    response = await harness.client.get(f"/api/recordings?before={cursor}")
    assert response.status == 422, await response.text()
    # For comparison: the same recording's download is refused and logged.
    download = await harness.client.get(f"/api/recordings/{theirs}/download")
    assert download.status == 403, await download.text()
    async with harness.app[DB_ENGINE].connect() as conn:
        download_refusals = (
            await conn.execute(
                sa.select(sa.func.count()).where(
                    access_log.c.action == "recording.download",
                    access_log.c.actor_id == other.therapist.account_id,
                    access_log.c.outcome == "refused",
                )
            )
        ).scalar_one()
    assert download_refusals == 1
    assert await _refused_list_reads(harness, other.therapist.account_id) == 1
