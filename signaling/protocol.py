"""The signaling protocol, version 1: message schemas, parsing, building.

Pure: no sockets, no aiohttp. Every inbound frame goes through
:func:`parse_inbound`, which returns a typed message or raises
:class:`ProtocolError` whose ``code`` and message name the problem. The
wire format is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import re
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

VERSION = 1
# A whole frame; larger ones are closed with 1009 by the transport.
MAX_FRAME_BYTES = 64 * 1024
# An SDP of a call with audio, video and screen share is a few KB; this
# leaves room for many codecs and candidates, not for abuse.
MAX_SDP_CHARS = 32 * 1024
MAX_CANDIDATE_CHARS = 1024


class ParticipantRole(enum.Enum):
    THERAPIST = "therapist"
    PATIENT = "patient"

    @property
    def other(self) -> ParticipantRole:
        if self is ParticipantRole.THERAPIST:
            return ParticipantRole.PATIENT
        return ParticipantRole.THERAPIST


class ErrorCode(enum.Enum):
    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    NOT_IN_CONSULT = "not_in_consult"
    NOT_ALLOWED = "not_allowed"
    NOT_ADMITTED = "not_admitted"
    PEER_ABSENT = "peer_absent"
    NO_PATIENT_WAITING = "no_patient_waiting"
    RATE_LIMITED = "rate_limited"
    CONSULT_OVER = "consult_over"
    # Recording: not offered by this server, or not possible in this state.
    RECORDING_UNAVAILABLE = "recording_unavailable"
    RECORDING_STATE = "recording_state"
    GUARDIAN_CONSENT_REQUIRED = "guardian_consent_required"
    # The shared state of several nodes (Redis) cannot be reached: try again.
    UNAVAILABLE = "unavailable"


# Refusals of a frame the client should never have sent (throttled, not
# valid, not its role's or not its consult's): signaling.max_refused of them in
# a row close the socket. The others answer what the room's state allows now
# (the peer is away, nobody waits, not admitted yet) and never count.
MISBEHAVIOUR = frozenset(
    {
        ErrorCode.RATE_LIMITED,
        ErrorCode.INVALID_JSON,
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.NOT_ALLOWED,
        ErrorCode.NOT_IN_CONSULT,
    }
)


class EndReason(enum.StrEnum):
    """Why a consult ended: the ``reason`` of ``consult-ended``."""

    ENDED_BY_THERAPIST = "ended_by_therapist"
    # Both participants left: by ``bye``, or their grace periods ran out.
    BOTH_LEFT = "both_left"
    MAX_DURATION = "max_duration"
    # The invite ran out and nobody joined (the housekeeping ends it).
    NOT_JOINED = "not_joined"
    # The record was closed elsewhere (another node, the housekeeping).
    CONSULT_OVER = "consult_over"


class CloseCode(enum.IntEnum):
    """The WebSocket close codes the server sends; 4000-4999 are this protocol's own."""

    NORMAL = 1000
    # The server is shutting down: reconnect.
    GOING_AWAY = 1001
    # Too many refused messages, or a client that does not read what it is sent.
    POLICY_VIOLATION = 1008
    # A frame over MAX_FRAME_BYTES (sent by the transport).
    MESSAGE_TOO_BIG = 1009
    # The consult cannot be opened now (Redis away): reconnect shortly.
    TRY_AGAIN_LATER = 1013
    # A newer connection of the same participant took over.
    REPLACED = 4001
    # The therapist's login session ended: log in again.
    SESSION_ENDED = 4002
    DENIED = 4003
    ENDED = 4004


class TimerKind(enum.StrEnum):
    """What a room timer does when it is due; the first part of its key."""

    # A participant's grace period to reconnect ran out.
    GRACE = "grace"
    # The consult reached its maximum duration.
    MAX_DURATION = "max"
    # The room is forgotten (ended an hour ago, or its invite ran out unused).
    FORGET = "forget"

    def key(self, consult_id: uuid.UUID, role: ParticipantRole | None = None) -> str:
        """The timer's key: one timer of each kind per consult (per role for a grace period)."""
        if role is None:
            return f"{self.value}:{consult_id}"
        return f"{self.value}:{consult_id}:{role.value}"

    @classmethod
    def of_key(cls, key: str) -> TimerKind:
        """The kind of a stored timer's key; raises :class:`UnknownTimerKind`
        when this version knows no such kind."""
        kind = key.split(":", 1)[0]
        try:
            return cls(kind)
        except ValueError:
            raise UnknownTimerKind(kind) from None


class UnknownTimerKind(ValueError):
    """A stored timer whose kind this version does not know (say, one a newer
    node left behind during an upgrade)."""

    def __init__(self, kind: str) -> None:
        # The kind alone: the rest of a key is a consult id.
        self.kind = kind[:32]
        super().__init__(
            f"unknown room timer kind {self.kind!r}; expected one of {', '.join(TimerKind)}"
        )


class RecordingState(enum.StrEnum):
    """The ``state`` of a ``recording`` message (docs/protocol.md, "Recording")."""

    REQUESTED = "requested"
    # The patient said no; the request is gone.
    REFUSED = "refused"
    STARTING = "starting"
    ON = "on"
    OFF = "off"


class PeerConnectionState(enum.StrEnum):
    """An ``RTCPeerConnection``'s ``connectionState`` (W3C WebRTC), as aiortc
    reports it; converted once, where it enters our code."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    # aiortc never reports this one; browsers do.
    DISCONNECTED = "disconnected"
    FAILED = "failed"
    CLOSED = "closed"

    @property
    def is_over(self) -> bool:
        """Whether the connection is gone for good."""
        return self in (PeerConnectionState.FAILED, PeerConnectionState.CLOSED)


class ProtocolError(Exception):
    """An inbound message is not acceptable; the connection goes on."""

    def __init__(self, code: ErrorCode, message: str, *, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # The type of the message that caused it, when known.
        self.ref = ref

    @classmethod
    def unavailable(cls, ref: str) -> ProtocolError:
        """The shared state or the database is away or busy: try again."""
        return cls(
            ErrorCode.UNAVAILABLE,
            "the server cannot do this right now; try again in a moment",
            ref=ref,
        )


class _Inbound(
    msgspec.Struct, tag_field="type", forbid_unknown_fields=True, frozen=True, kw_only=True
):
    """A message from a client. The JSON field ``type`` picks the class (its
    tag), and is each class's ``type`` attribute, not a field of its own."""

    if TYPE_CHECKING:
        type: ClassVar[str]

    # The JSON integer 1: msgspec is strict, so neither true nor 1.0.
    v: Annotated[int, Meta(ge=VERSION, le=VERSION)]
    # Optional: a client may name its consult; naming another one is an error.
    consult: Annotated[str, Meta(max_length=64)] | None = None


_Sdp = Annotated[str, Meta(min_length=1, max_length=MAX_SDP_CHARS)]


class Ping(_Inbound, tag="ping", frozen=True):
    pass


class Admit(_Inbound, tag="admit", frozen=True):
    pass


class Deny(_Inbound, tag="deny", frozen=True):
    pass


class End(_Inbound, tag="end", frozen=True):
    pass


class Bye(_Inbound, tag="bye", frozen=True):
    pass


class Offer(_Inbound, tag="offer", frozen=True, kw_only=True):
    sdp: _Sdp


class Answer(_Inbound, tag="answer", frozen=True, kw_only=True):
    sdp: _Sdp


class Candidate(_Inbound, tag="candidate", frozen=True, kw_only=True):
    # An empty string marks the end of candidates.
    candidate: Annotated[str, Meta(max_length=MAX_CANDIDATE_CHARS)]
    sdpMid: Annotated[str, Meta(max_length=64)] | None = None
    sdpMLineIndex: Annotated[int, Meta(ge=0, le=64)] | None = None


class RecordRequest(_Inbound, tag="record-request", frozen=True):
    """The therapist asks to record; the patient is asked for consent."""


class RecordConsent(_Inbound, tag="record-consent", frozen=True, kw_only=True):
    """The patient's answer to a ``record-request``; ``by`` says who agreed
    (a guardian, when the invite is for a patient under 16)."""

    agree: bool
    by: Literal["patient", "guardian"] = "patient"
    # The ``request`` of the ``recording`` "requested" message being answered.
    request: Annotated[str, Meta(min_length=1, max_length=32)] | None = None


class RecordStop(_Inbound, tag="record-stop", frozen=True):
    """Either participant stops the recording (or withdraws the request)."""


class RecorderOffer(_Inbound, tag="recorder-offer", frozen=True, kw_only=True):
    """An offer for the participant's connection to the server's recorder:
    its own camera and microphone, send-only, with every ICE candidate."""

    sdp: _Sdp


# What a participant's camera or microphone is doing, as the page knows it:
# sending ("on"), switched off by the participant ("off": muted, camera off),
# or not to be had ("missing", "blocked" by the browser, "busy" elsewhere).
DeviceState = Literal["on", "off", "missing", "blocked", "busy"]


class MediaState(_Inbound, tag="media-state", frozen=True, kw_only=True):
    """What the sender's camera and microphone are doing, for the other
    participant's page (a dark stage says why); relayed like an offer."""

    camera: DeviceState
    microphone: DeviceState


# What a client may report for the technical log (kept 24 hours).
REPORT_EVENTS = (
    "ice-state",
    "connection-state",
    "call-failed",
    "media-error",
    "stats",
)
MAX_REPORT_FIELDS = 20
MAX_REPORT_TEXT = 200
# Integers beyond JavaScript's safe range are kept as floats, as a browser has them.
MAX_REPORT_INTEGER = 2**53


class _ReportValueError(ValueError):
    pass


def _report_value(value: Any) -> str | int | float | bool | None:
    """One value of a report's detail: a string of at most 200 characters, a
    finite number, true, false or null. NaN and Infinity are no JSON (``1e999``
    reads as infinity), and the technical log's JSON column refuses them."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) <= MAX_REPORT_TEXT:
        return value
    if isinstance(value, int):
        if -MAX_REPORT_INTEGER <= value <= MAX_REPORT_INTEGER:
            return value
        # Beyond it a browser's number is a float already.
        with contextlib.suppress(OverflowError):
            return float(value)
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise _ReportValueError(
        "must be a string of at most 200 characters, a finite number, true, false or null"
    )


class Report(_Inbound, tag="report", frozen=True, kw_only=True):
    """A diagnostic from the client's page (ICE state, a failed call's stats,
    a camera error) for the technical log; not relayed."""

    event: Literal["ice-state", "connection-state", "call-failed", "media-error", "stats"]
    # The values are checked by __post_init__, which can name the field.
    detail: Annotated[
        dict[Annotated[str, Meta(max_length=40)], Any], Meta(max_length=MAX_REPORT_FIELDS)
    ] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        detail = self.detail
        for name, value in detail.items():
            try:
                # The dict is this message's own (decoded for it): a large
                # integer becomes the float a browser has.
                detail[name] = _report_value(value)
            except _ReportValueError as err:
                raise ValueError(f"field {_name('detail.' + name)}: {err}") from None


_MESSAGES: tuple[type[_Inbound], ...] = (
    Ping,
    Admit,
    Deny,
    End,
    Bye,
    Offer,
    Answer,
    Candidate,
    Report,
    RecordRequest,
    RecordConsent,
    RecordStop,
    RecorderOffer,
    MediaState,
)
for _message in _MESSAGES:
    # The tag as a class attribute: ``message.type`` costs an attribute lookup.
    _message.type = str(_message.__struct_config__.tag)

InboundMessage = (
    Ping
    | Admit
    | Deny
    | End
    | Bye
    | Offer
    | Answer
    | Candidate
    | Report
    | RecordRequest
    | RecordConsent
    | RecordStop
    | RecorderOffer
    | MediaState
)
INBOUND_TYPES = tuple(message.type for message in _MESSAGES)
# What only the therapist may send.
THERAPIST_ONLY = frozenset({"admit", "deny", "end", "record-request"})
# What only the patient may send.
PATIENT_ONLY = frozenset({"record-consent"})
# What is relayed to the other participant as it is.
RELAYED = frozenset({"offer", "answer", "candidate", "media-state"})

# Parses and validates in one pass, in C.
_decode: Callable[[str], InboundMessage] = msgspec.json.Decoder(InboundMessage).decode


def parse_inbound(frame: str) -> InboundMessage:
    """Parse and validate one text frame; raise :class:`ProtocolError` naming the problem."""
    try:
        # The fast path. Only a frame that fails takes the slow path below,
        # to name the problem.
        return _decode(frame)
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    except (RecursionError, UnicodeEncodeError):
        # A report's detail value nested a thousand deep; a str holding a
        # lone surrogate itself (not the socket's: it decodes strict UTF-8).
        pass
    return _explain(frame)


def _json_int(text: str) -> int | float:
    return int(text) if len(text) <= _MAX_INT_DIGITS else float(text)


# Python's limit for converting a text to an int (sys.get_int_max_str_digits()).
_MAX_INT_DIGITS = 4300
# A lone surrogate (json.loads reads "\ud800" as one): not text, so not in any
# field or field name. A report's detail values are the exception, as before.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Of a field name quoted in an error: the start of a long one.
_NAME_CHARS = 64
# msgspec's words for where a problem is: a field's value, or a key in one.
_AT = re.compile(r"^(.*) - at `\$\.([A-Za-z]+)(\[\.\.\.\])?`$", re.DOTALL)
_AT_KEY = re.compile(r"^(.*) - at `key` in `\$\.([A-Za-z]+)`$", re.DOTALL)


def _fields(message: type[_Inbound]) -> tuple[frozenset[str], tuple[str, ...]]:
    """The JSON fields of ``message`` (its tag aside), and the required ones in order."""
    fields = msgspec.structs.fields(message)
    return (
        frozenset(field.encode_name for field in fields),
        tuple(field.encode_name for field in fields if field.required),
    )


def _literal_choices(message: type[_Inbound]) -> dict[str, tuple[str, ...]]:
    """The values a field of ``message`` may take where there is a short list."""
    choices = {}
    for field in msgspec.inspect.type_info(message).fields:  # type: ignore[attr-defined]
        kind = field.type
        if isinstance(kind, msgspec.inspect.UnionType):
            kind = next((t for t in kind.types if isinstance(t, msgspec.inspect.LiteralType)), kind)
        if isinstance(kind, msgspec.inspect.LiteralType):
            choices[field.encode_name] = tuple(str(value) for value in kind.values)
    return choices


# By message type: its fields, and those with a short list of values.
_FIELDS = {message.type: _fields(message) for message in _MESSAGES}
_CHOICES = {message.type: _literal_choices(message) for message in _MESSAGES}


def _name(name: str) -> str:
    """A field's name as an error quotes it: the start of a long one."""
    return repr(name if len(name) <= _NAME_CHARS else name[:_NAME_CHARS] + "…")


def _explain(frame: str) -> InboundMessage:
    try:
        # An integer too long for Python's text conversion reads as infinity,
        # which the message's fields then refuse by name, as they refuse NaN
        # and Infinity (not JSON, but Python's parser takes them).
        data: Any = json.loads(frame, parse_int=_json_int)
    except (json.JSONDecodeError, ValueError, RecursionError):
        raise ProtocolError(ErrorCode.INVALID_JSON, "the message is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_JSON, "the message must be a JSON object")
    kind = data.get("type")
    ref = kind if isinstance(kind, str) and len(kind) <= 32 else None
    version = data.get("v")
    if type(version) is not int or version != VERSION:  # true == 1 in Python
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"field 'v' must be {VERSION} (the protocol version)",
            ref=ref,
        )
    if kind not in INBOUND_TYPES:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type; expected one of {', '.join(INBOUND_TYPES)}",
            ref=ref,
        )
    problem = _fields_problem(data, kind)
    if problem is None:
        try:
            return msgspec.convert(data, InboundMessage, strict=True)  # type: ignore[no-any-return]
        except msgspec.ValidationError as err:
            problem = _problem(str(err), kind)
        except RecursionError:
            problem = "the message is nested too deep"
    raise ProtocolError(ErrorCode.INVALID_MESSAGE, problem, ref=ref)


def _fields_problem(data: dict[str, Any], kind: str) -> str | None:
    """A field not known, missing, or holding what is not text; checked here
    rather than read out of msgspec's words, which quote a name as it came."""
    known, required = _FIELDS[kind]
    a_kind = f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
    for name, value in data.items():
        if name != "type" and name not in known:
            return f"field {_name(name)} is not part of {a_kind} message"
        if isinstance(value, str) and _SURROGATE.search(value):
            return f"field {_name(name)}: not text (a lone surrogate)"
    for name in required:
        if name not in data:
            return f"field {_name(name)} is required in {a_kind} message"
    detail = data.get("detail")
    if kind == "report" and isinstance(detail, dict):
        for name in detail:
            if _SURROGATE.search(name):
                return "field 'detail': a field's name is not text (a lone surrogate)"
    return None


def _problem(text: str, kind: str) -> str:
    """The client's words for msgspec's ``text`` about a ``kind`` message
    (the fields are known ones here: :func:`_fields_problem` came first)."""
    if text.startswith("field '"):
        # Already named (a report's detail).
        return text
    if (key := _AT_KEY.match(text)) is not None:
        return f"field {key.group(2)!r}: a field's name: {key.group(1)}"
    where = "message"
    if (at := _AT.match(text)) is not None:
        text, where = at.group(1), at.group(2)
    choices = _CHOICES[kind].get(where)
    if choices is not None and text.startswith("Invalid enum value"):
        # Not msgspec's words: they quote the value, whatever its length.
        text = f"expected one of {', '.join(choices)}"
    return f"field {where!r}: {text}"


def outbound(kind: str, **fields: Any) -> dict[str, Any]:
    """Build an outbound message."""
    return {"v": VERSION, "type": kind, **fields}


def presence_message(role: ParticipantRole, *, present: bool) -> dict[str, Any]:
    """``peer-presence``, to a waiting patient: the therapist came or went."""
    return outbound("peer-presence", role=role.value, present=present)


def error_message(err: ProtocolError) -> dict[str, Any]:
    fields: dict[str, Any] = {"code": err.code.value, "message": err.message}
    if err.ref is not None:
        fields["ref"] = err.ref
    return outbound("error", **fields)


def names_consult(text: str, consult_id: uuid.UUID) -> bool:
    """Whether ``text`` is ``consult_id``, in any spelling the API takes too
    (capitals, as some platforms print a UUID)."""
    if text == str(consult_id):
        return True
    try:
        return uuid.UUID(text) == consult_id
    except ValueError:
        return False
