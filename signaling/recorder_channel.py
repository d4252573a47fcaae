"""The channel between the signaling process and a recorder worker (pure).

One JSON object per line, each way, over the worker's stdin (requests) and
a private pipe the worker writes its replies and events to. Pipes, not a
socket: nothing else on the machine can connect, and the data key crosses
only here (never argv, the environment or the disk).

Requests carry an ``id`` and an ``op`` (:class:`Op`); each gets one reply
with the same ``id``: ``{"id": 3, "ok": <result>}`` or ``{"id": 3, "error":
{"kind": ..., "message": ...}}``. Requests may overlap (``wait_connected``
waits while the second participant's offer is answered). Events have no
``id``: ``{"event": "ready"}`` (once, when it reads requests),
``{"event": "failure", ...}`` (the recorder failed; the parent then
stops it) and ``{"event": "progress", "plaintext_bytes": n}`` (how much
reached the file, so a worker that dies still leaves a true figure).

Why not a library: :mod:`multiprocessing.connection` blocks (a thread per
worker to read it) and pickles; aiomultiprocess and the like run pools of
functions, not one long-lived object with callbacks. A line of JSON over
asyncio's subprocess pipes is what both would reduce to here.
"""

from __future__ import annotations

import enum
import json
import uuid
from typing import Any

from audit.recordings import RecordingFile
from signaling.protocol import ParticipantRole

# An SDP offer is some kilobytes; a line longer than this is not ours.
MAX_LINE_BYTES = 1 << 20


class Op(enum.StrEnum):
    """What the signaling process asks of its recorder worker."""

    ACCEPT_OFFER = "accept_offer"
    WAIT_CONNECTED = "wait_connected"
    START = "start"
    STOP = "stop"


class Event(enum.StrEnum):
    """What the worker tells without being asked."""

    # Up and reading requests (its imports take a second or two).
    READY = "ready"
    FAILURE = "failure"
    PROGRESS = "progress"


class ErrorKind(enum.StrEnum):
    """The recorder's exceptions, named on the wire and raised again on the other side."""

    INVALID_OFFER = "invalid_offer"
    RECORDER_ERROR = "recorder_error"
    OS_ERROR = "os_error"
    INTERNAL = "internal"


class ChannelError(Exception):
    """A line that is not a message of this channel."""


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One line as a message; raises :class:`ChannelError` for anything else."""
    try:
        message = json.loads(line)
    except ValueError as err:
        raise ChannelError(f"not a JSON line: {line[:80]!r}") from err
    if not isinstance(message, dict):
        raise ChannelError(f"not a JSON object: {line[:80]!r}")
    return message


def file_to_wire(file: RecordingFile) -> dict[str, str]:
    return {"path": file.path, "file_id": str(file.file_id), "data_key": file.data_key.hex()}


def file_from_wire(fields: dict[str, Any]) -> RecordingFile:
    try:
        return RecordingFile(
            str(fields["path"]), uuid.UUID(fields["file_id"]), bytes.fromhex(fields["data_key"])
        )
    except (KeyError, ValueError, TypeError) as err:
        raise ChannelError(f"not a recording file: {sorted(fields)}") from err


def roles_to_wire(roles: frozenset[ParticipantRole]) -> list[str]:
    return sorted(role.value for role in roles)


def roles_from_wire(values: Any) -> frozenset[ParticipantRole]:
    try:
        return frozenset(ParticipantRole(value) for value in values)
    except (ValueError, TypeError) as err:
        raise ChannelError(f"not participant roles: {values!r}") from err
