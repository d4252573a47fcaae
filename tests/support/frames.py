"""Random and malformed signaling frames, and what protocol.md says the server answers to each.

:data:`FRAMES` makes frames of every kind: any text, any JSON, binary, and
messages that look almost right (known types with fields of any type, some
naming the other consult). :func:`classify` is the protocol's reading of a
frame, written from docs/protocol.md, not from the server's parser: the
refusal it earns (``error`` code and ``ref``), or the message it is.

The placeholders :data:`OWN` and :data:`OTHER` in a frame stand for the
sender's consult and another consult; :func:`placed` puts the ids in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

OWN = "__own_consult__"
OTHER = "__other_consult__"

INBOUND_TYPES = (
    "ping",
    "admit",
    "deny",
    "end",
    "bye",
    "offer",
    "answer",
    "candidate",
    "report",
    "record-request",
    "record-consent",
    "record-stop",
    "recorder-offer",
    "media-state",
)
RELAYED = frozenset({"offer", "answer", "candidate", "media-state"})
THERAPIST_ONLY = frozenset({"admit", "deny", "end", "record-request"})
PATIENT_ONLY = frozenset({"record-consent"})
RECORDING = frozenset({"record-request", "record-consent", "record-stop", "recorder-offer"})
DEVICE_STATES = ("on", "off", "missing", "blocked", "busy")
REPORT_EVENTS = ("ice-state", "connection-state", "call-failed", "media-error", "stats")
# Refusals of what a client should never send: signaling.max_refused of them
# in a row close the socket with 1008 ("Limits").
MISBEHAVIOUR = frozenset(
    {
        "rate_limited",
        "invalid_json",
        "invalid_message",
        "unknown_type",
        "unsupported_version",
        "not_allowed",
        "not_in_consult",
    }
)
MAX_FRAME_BYTES = 64 * 1024
MAX_SDP = 32 * 1024

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Messages that look almost right: known types with random fields, some of
# them naming this consult or the other one.
ALMOST = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 2, "1", None, True, 1.0]),
        "type": st.sampled_from([*INBOUND_TYPES, "x", "", "PING"]),
    },
    optional={
        "sdp": st.text(max_size=40) | JSON_VALUES,
        "candidate": st.text(max_size=40) | JSON_VALUES,
        "sdpMid": st.none() | st.text(max_size=3) | JSON_VALUES,
        "sdpMLineIndex": st.none() | st.integers(-1, 65) | JSON_VALUES,
        "agree": st.booleans() | JSON_VALUES,
        "by": st.sampled_from(["patient", "guardian", "parent"]) | JSON_VALUES,
        "request": st.none() | st.text(max_size=33) | JSON_VALUES,
        "event": st.sampled_from([*REPORT_EVENTS, "nope"]) | JSON_VALUES,
        "detail": st.dictionaries(st.text(max_size=41), JSON_VALUES, max_size=21) | JSON_VALUES,
        "camera": st.sampled_from(DEVICE_STATES) | JSON_VALUES,
        "microphone": st.sampled_from([*DEVICE_STATES, "loud"]) | JSON_VALUES,
        "consult": st.sampled_from([OWN, OTHER]) | JSON_VALUES,
    },
).map(json.dumps)
FRAMES = st.one_of(
    st.text(max_size=300),
    JSON_VALUES.map(json.dumps),
    ALMOST,
    st.binary(max_size=64),
)


def placed(frame: str | bytes, own: str, other: str) -> str | bytes:
    """The frame with the consults' ids in place of :data:`OWN` and :data:`OTHER`."""
    if isinstance(frame, bytes):
        return frame
    return frame.replace(OWN, own).replace(OTHER, other)


@dataclass(frozen=True)
class Refused:
    """The frame earns an ``error`` with this ``code`` and ``ref``, whatever the state."""

    code: str
    ref: str | None


@dataclass(frozen=True)
class Valid:
    """A well-formed message; what it does depends on the consult's state."""

    message: dict[str, Any]


def classify(frame: str | bytes) -> Refused | Valid:
    """What docs/protocol.md ("Messages", "Error codes", "Limits") says of a frame."""
    if isinstance(frame, bytes):
        return Refused("invalid_json", None)  # the protocol is text
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        return Refused("invalid_json", None)
    if not isinstance(data, dict):
        return Refused("invalid_json", None)  # one JSON object
    kind = data.get("type")
    ref = kind if isinstance(kind, str) and len(kind) <= 32 else None
    if not _is_int(data.get("v"), 1, 1):
        return Refused("unsupported_version", ref)
    if not isinstance(kind, str) or kind not in INBOUND_TYPES:
        return Refused("unknown_type", ref)
    if not _fields_valid(kind, data):
        return Refused("invalid_message", ref)
    return Valid(data)


def _is_int(value: Any, low: int, high: int) -> bool:
    # A JSON integer: not true/false, not 1.0.
    return type(value) is int and low <= value <= high


def _is_text(value: Any, *, low: int = 0, high: int) -> bool:
    if not isinstance(value, str) or not low <= len(value) <= high:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False  # a lone surrogate is no text
    return True


def _optional(data: dict[str, Any], name: str, check: Any) -> bool:
    return name not in data or data[name] is None or bool(check(data[name]))


def _report_detail(detail: Any) -> bool:
    if not isinstance(detail, dict) or len(detail) > 20:
        return False
    return all(
        _is_text(key, high=40)
        and (
            value is None
            or isinstance(value, bool | int)
            # A finite number: NaN, Infinity and 1e999 (JSON's infinity) are refused.
            or (isinstance(value, float) and math.isfinite(value))
            or _is_text(value, high=200)
        )
        for key, value in detail.items()
    )


# Per type: its fields (besides v, type and consult), whether each is
# required, and what it may hold (the "From the client" table).
_SDP = (True, lambda value: _is_text(value, low=1, high=MAX_SDP))
_FIELDS: dict[str, dict[str, tuple[bool, Any]]] = {
    "ping": {},
    "admit": {},
    "deny": {},
    "end": {},
    "bye": {},
    "record-request": {},
    "record-stop": {},
    "offer": {"sdp": _SDP},
    "answer": {"sdp": _SDP},
    "recorder-offer": {"sdp": _SDP},
    "candidate": {
        "candidate": (True, lambda value: _is_text(value, high=1024)),
        "sdpMid": (False, lambda value: value is None or _is_text(value, high=64)),
        "sdpMLineIndex": (False, lambda value: value is None or _is_int(value, 0, 64)),
    },
    "record-consent": {
        "agree": (True, lambda value: isinstance(value, bool)),
        "by": (False, lambda value: value in ("patient", "guardian")),
        "request": (False, lambda value: value is None or _is_text(value, low=1, high=32)),
    },
    "media-state": {
        "camera": (True, lambda value: isinstance(value, str) and value in DEVICE_STATES),
        "microphone": (True, lambda value: isinstance(value, str) and value in DEVICE_STATES),
    },
    "report": {
        "event": (True, lambda value: value in REPORT_EVENTS),
        "detail": (False, _report_detail),
    },
}


def _fields_valid(kind: str, data: dict[str, Any]) -> bool:
    fields = _FIELDS[kind]
    if set(data) - {"v", "type", "consult", *fields}:
        return False  # unknown fields are refused
    if not _optional(data, "consult", lambda value: _is_text(value, high=64)):
        return False
    for name, (required, check) in fields.items():
        if name not in data:
            if required:
                return False
            continue
        if not check(data[name]):
            return False
    return True
