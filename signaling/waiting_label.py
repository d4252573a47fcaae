"""``patient-waiting`` for the therapist, with their label for the patient.

The label is the one piece of a waiting room that names someone, so it is
read where it is shown and nowhere kept: unsealed from its row for the
message, and each showing written to the access log first (DESIGN.md,
promise 6: every read of a consult's data is logged), as the therapist who
is shown it, over the signaling socket. A showing whose record does not
commit does not happen: the therapist still hears that the patient waits,
without the label. The message is made inside the room's change, so that
the therapist's messages keep their order (patient-waiting before a
peer-left that follows it); the record's wait is bounded by
:data:`RECORD_WAIT_S`, which is all it can hold up the consult's other
changes when the access log is slow (a chain held by a purge).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from audit.access_log import Actor, ClientType
from audit.access_writer import AccessLogWriter
from audit.clock import Clock
from audit.errors import AccessLogNotWritten
from audit.labels import SealedLabel
from signaling.protocol import ParticipantRole, outbound

_log = structlog.get_logger("videoconsult.signaling")

# The access record's action (the receipt names it for the patient).
LABEL_READ_ACTION = "consult.label.read"
# How long the notice waits for that record (a group commit takes milliseconds).
RECORD_WAIT_S = 1.0


class WaitingLabels:
    """Makes ``patient-waiting`` messages, showing each label once it is recorded."""

    def __init__(self, root_key: bytes, access_log: AccessLogWriter, clock: Clock) -> None:
        self._root_key = root_key  # opens the labels
        self._access_log = access_log
        self._clock = clock

    async def patient_waiting(self, label: SealedLabel | None) -> dict[str, Any]:
        """The message, with the label unsealed (None without one, or when its
        read could not be recorded within :data:`RECORD_WAIT_S`)."""
        return outbound("patient-waiting", display_name=await self._shown(label))

    async def _shown(self, label: SealedLabel | None) -> str | None:
        if label is None or label.therapist_id is None or label.organisation_id is None:
            # No label, or no therapist to read it as (an erased account's
            # consult): nothing is shown, so nothing is recorded.
            return None
        opened = label.open(self._root_key)
        if opened is None:
            return None
        reader = Actor(label.therapist_id, ParticipantRole.THERAPIST.value, ClientType.WEBSOCKET)
        try:
            async with asyncio.timeout(RECORD_WAIT_S):
                await self._access_log.record(
                    reader,
                    organisation_id=label.organisation_id,
                    action=LABEL_READ_ACTION,
                    object_type="consult",
                    object_id=label.consult_id,
                    now=self._clock.now(),
                )
        except (AccessLogNotWritten, TimeoutError):
            # Not written, or not yet (the chain held by a purge): the notice
            # goes out now, without the label. A record still queued is
            # written later: one record too many, never one too few.
            _log.warning("label not shown: its access record was not written in time")
            return None
        return opened
