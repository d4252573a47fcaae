"""How deliveries, room states and times are written in Redis (pure).

Parsers and serialisers only, no client: each ``decode_*`` raises
ValueError on anything its ``encode_*`` did not write.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from signaling.ports import Delivery
from signaling.state import Link, Presence, RecordingPhase, RoomPhase, RoomState

__all__ = [
    "as_str",
    "decode_delivery",
    "decode_room_state",
    "encode_delivery",
    "encode_room_state",
    "glob_escaped",
    "moment_of_score_us",
    "origin_marker",
    "score_us",
    "versioned",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def as_str(value: str | bytes) -> str:
    """A reply as text, whether the client has ``decode_responses`` or not."""
    return value.decode() if isinstance(value, bytes) else value


def glob_escaped(text: str) -> str:
    """``text`` matched literally in a PSUBSCRIBE or SCAN pattern."""
    for special in "\\*?[]":
        text = text.replace(special, f"\\{special}")
    return text


# Deliveries.


def encode_delivery(delivery: Delivery, *, origin: str = "") -> str:
    """Serialise a delivery for the wire: a JSON header line, then the text.

    The header holds the publishing node (``origin``, first, so that a node
    recognises its own deliveries without decoding them), ``message``,
    ``connection_id`` and ``close_code``, and never a raw newline (JSON
    escapes them), so the first newline ends it. A pre-encoded text (a
    relayed SDP of a few KB) follows as it is, rather than escaped inside
    the JSON again.
    """
    header = json.dumps(
        {
            "origin": origin,
            "message": delivery.message,
            "connection_id": delivery.connection_id,
            "close_code": delivery.close_code,
            "has_text": delivery.text is not None,
        },
        separators=(",", ":"),
    )
    return header if delivery.text is None else f"{header}\n{delivery.text}"


def origin_marker(node_id: str) -> str:
    """How :func:`encode_delivery`'s output from ``node_id`` begins."""
    return '{"origin":' + json.dumps(node_id) + ","


def decode_delivery(data: str) -> Delivery:
    """Rebuild a delivery from :func:`encode_delivery`'s output.

    Raises ValueError when ``data`` is not such an output.
    """
    header_text, newline, text = data.partition("\n")
    header = json.loads(header_text)
    if not isinstance(header, dict) or not isinstance(header.get("message"), dict):
        raise ValueError("delivery header is not an object with a message object")
    connection_id = header.get("connection_id")
    close_code = header.get("close_code")
    if connection_id is not None and not isinstance(connection_id, str):
        raise ValueError(f"delivery connection_id is a {type(connection_id).__name__}")
    if close_code is not None and (isinstance(close_code, bool) or not isinstance(close_code, int)):
        raise ValueError(f"delivery close_code is a {type(close_code).__name__}")
    if bool(header.get("has_text")) != bool(newline):
        raise ValueError("delivery header and text disagree on whether there is a text")
    return Delivery(
        header["message"],
        connection_id=connection_id,
        close_code=close_code,
        text=text if newline else None,
    )


# Room states.


def encode_room_state(state: RoomState) -> str:
    """A room's state as JSON. It holds no personal data: the therapist's label
    for the waiting room is read from its sealed row when it is shown."""
    return json.dumps(
        {
            "phase": state.phase.value,
            "therapist": _presence_dict(state.therapist),
            "patient": _presence_dict(state.patient),
            "recording": state.recording.value,
            "keep_until": state.keep_until.isoformat() if state.keep_until else None,
        },
        separators=(",", ":"),
    )


def decode_room_state(data: str | bytes) -> RoomState:
    """Rebuild :func:`encode_room_state`'s output; ValueError when it is not one.

    A ``display_name`` (the label, which older versions kept here) is ignored.
    """
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"a room state is a {type(value).__name__}")
    return RoomState(
        phase=RoomPhase(value.get("phase")),
        therapist=_presence(value.get("therapist")),
        patient=_presence(value.get("patient")),
        recording=RecordingPhase(value.get("recording", RecordingPhase.OFF.value)),
        keep_until=_moment(value.get("keep_until")),
    )


def versioned(value: str | bytes) -> tuple[int, str]:
    """Split a stored or published room value, ``"{version} {json}"``, into
    its version and JSON ("" for a dropped room); ValueError when it is neither."""
    text = as_str(value)
    if text.startswith("{"):
        return 0, text  # saved before rooms had versions
    version, space, state = text.partition(" ")
    if not space:
        raise ValueError("a room value has no version")
    return int(version), state


def _presence_dict(presence: Presence | None) -> dict[str, Any] | None:
    if presence is None:
        return None
    return {
        "connection": presence.connection_id,
        "link": presence.link.value,
        "left_at": presence.left_at.isoformat() if presence.left_at else None,
        "node": presence.node,
    }


def _presence(value: Any) -> Presence | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"a presence is a {type(value).__name__}")
    connection_id, node = value.get("connection"), value.get("node", "")
    if not isinstance(connection_id, str) or not isinstance(node, str):
        raise ValueError("a presence's connection and node are strings")
    return Presence(
        connection_id, Link(value.get("link")), left_at=_moment(value.get("left_at")), node=node
    )


def _moment(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"a time is a {type(value).__name__}")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("a time without a time zone")
    return moment


# Times, as scores of sorted sets.


def score_us(moment: datetime) -> int:
    """Microseconds since the epoch: exact in a sorted set's double score
    (below 2**53 until the year 2255), where float seconds would round.

    Raises ValueError for a time without a time zone."""
    if moment.tzinfo is None:
        raise ValueError(f"timer time {moment.isoformat()} has no time zone")
    since = moment - _EPOCH
    return (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds


def moment_of_score_us(score: float) -> datetime:
    """The time :func:`score_us` made ``score`` of (in UTC)."""
    return _EPOCH + timedelta(microseconds=int(score))
