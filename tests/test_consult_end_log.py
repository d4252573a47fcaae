"""The end of a consult goes into the 24-hour technical log with how it
ended, so that support can see more than "Ended"."""

from __future__ import annotations

import pytest

from audit.technical_log import read_technical
from server.app_keys import DB_ENGINE, TECHNICAL_LOG
from tests.support.harness import Harness, Sockets, admitted_pair, receive

pytestmark = pytest.mark.signaling_backends


async def test_the_technical_log_says_how_a_consult_ended(
    harness: Harness, sockets: Sockets
) -> None:
    setup, therapist, patient = await admitted_pair(harness, sockets)
    await therapist.send_json({"v": 1, "type": "end"})
    assert (await receive(patient, "consult-ended"))["reason"] == "ended_by_therapist"
    await harness.app[TECHNICAL_LOG].flush(harness.app[DB_ENGINE])
    async with harness.app[DB_ENGINE].connect() as conn:
        found = await read_technical(conn, now=harness.clock.now(), subject=setup.consult_id)
    ended = [entry for entry in found if entry.kind == "signaling.consult-ended"]
    assert len(ended) == 1, [entry.kind for entry in found]
    assert ended[0].detail["reason"] == "ended_by_therapist"
