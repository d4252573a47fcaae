"""``patient-waiting`` for the therapist, with their label for the patient.

The label is the one piece of a waiting room that names someone, so it is
read where it is shown and nowhere kept: unsealed from its row for the
message, and each showing written to the access log first (DESIGN.md,
promise 6: every read of a consult's data is logged), as the therapist who
is shown it, over the signaling socket. A showing whose record does not
commit does not happen: the therapist still hears that the patient waits,
without the label.
"""

from __future__ import annotations

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


class WaitingLabels:
    """Makes ``patient-waiting`` messages, showing each label once it is recorded."""

    def __init__(self, root_key: bytes, access_log: AccessLogWriter, clock: Clock) -> None:
        self._root_key = root_key  # opens the labels
        self._access_log = access_log
        self._clock = clock

    async def patient_waiting(
        self, label: SealedLabel | None, *, shown: bool = True
    ) -> dict[str, Any]:
        """The message, with the label unsealed (None without one, or when its
        read could not be recorded); ``shown=False`` when no therapist is
        there to be shown it (the message waits for nobody): no label, no record."""
        return outbound("patient-waiting", display_name=await self._shown(label) if shown else None)

    async def _shown(self, label: SealedLabel | None) -> str | None:
        opened = label.open(self._root_key) if label is not None else None
        if label is None or opened is None:
            return None
        reader = Actor(label.therapist_id, ParticipantRole.THERAPIST.value, ClientType.WEBSOCKET)
        try:
            await self._access_log.record(
                reader,
                organisation_id=label.organisation_id,
                action=LABEL_READ_ACTION,
                object_type="consult",
                object_id=label.consult_id,
                now=self._clock.now(),
            )
        except AccessLogNotWritten:
            _log.warning("label not shown: its access record was not written")
            return None
        return opened
