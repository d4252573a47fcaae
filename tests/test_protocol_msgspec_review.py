"""Review of the msgspec parser (commit 3471588): frames whose handling
changed for the worse against the pydantic parser before it (27a2fa0).

Each test is a frame the old parser answered as docs/protocol.md says (and as
tests/support/frames.py, the protocol's own reading, classifies it) and the
new one does not: it raises something other than :class:`ProtocolError`
(which cuts the socket: server/ws/connection.py ``_handling_failed``), takes
what was refused, or answers with a message that echoes the input or names a
field that was not sent.
"""

from __future__ import annotations

import json

import pytest

from signaling.protocol import ErrorCode, ProtocolError, parse_inbound


def _refused(frame: str) -> ProtocolError:
    """The refusal of ``frame``; anything else raised fails the test as it is."""
    with pytest.raises(ProtocolError) as refused:
        parse_inbound(frame)
    return refused.value


@pytest.mark.parametrize(
    "frame",
    [
        '{"v": 1, "type": "ping", "\\ud800": 1}',
        '{"v": 1, "type": "ping", "consult\\udc00": "c"}',
        '{"v": 1, "type": "offer", "s\\udc00p": "v=0\\r\\n"}',
        '{"v": 1, "type": "candidate", "candidate": "x", "\\ud800pMid": "0"}',
    ],
)
def test_an_unknown_field_named_with_a_lone_surrogate_escape_is_refused(frame: str) -> None:
    """Found: a field name holding a lone surrogate escape (valid UTF-8 text,
    JSON by RFC 8259's grammar) makes ``msgspec.convert`` in ``_explain``
    raise UnicodeEncodeError, which parse_inbound lets through: the reader
    catches only ProtocolError, so one such frame cuts the sender's socket
    (1006, logged as a failure) instead of an ``invalid_message`` error. The
    pydantic parser refused it with ``invalid_message``."""
    refused = _refused(frame)
    assert refused.code is ErrorCode.INVALID_MESSAGE


def test_a_deeply_nested_report_value_is_refused() -> None:
    """Found: a report's detail value nested a few thousand arrays deep (10 KB,
    well inside the 64 KiB frame) makes the fast path's msgspec decoder raise
    RecursionError, which parse_inbound does not catch (it catches only
    ValidationError and DecodeError), so the socket is cut. ``detail`` is
    typed ``Any``, so msgspec recurses into it; the other fields refuse the
    array at once. The pydantic parser answered ``invalid_json``, as
    tests/support/frames.py (json.loads's RecursionError) says."""
    depth = 5000
    frame = (
        '{"v": 1, "type": "report", "event": "stats", "detail": {"a": '
        + "[" * depth
        + "]" * depth
        + "}}"
    )
    refused = _refused(frame)
    assert refused.code in (ErrorCode.INVALID_JSON, ErrorCode.INVALID_MESSAGE)


def test_a_raw_lone_surrogate_in_the_text_is_refused() -> None:
    """Found: a str holding a lone surrogate itself (not an escape) makes
    msgspec's decoder raise UnicodeEncodeError (it needs the text as UTF-8),
    which parse_inbound lets through; its contract is a message or a
    ProtocolError, and the pydantic parser refused it with ``invalid_message``.
    Low severity: aiohttp decodes text frames as strict UTF-8 (1007 before
    parse_inbound), so only a caller other than the socket reader meets it."""
    refused = _refused('{"v": 1, "type": "offer", "sdp": "\ud800"}')
    assert refused.code is ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ('{"v": 1, "type": "offer", "sdp": "v=0\\ud800"}', "sdp"),
        ('{"v": 1, "type": "answer", "sdp": "\\udc00\\ud800"}', "sdp"),
        ('{"v": 1, "type": "recorder-offer", "sdp": "v=0\\udc00"}', "sdp"),
        ('{"v": 1, "type": "candidate", "candidate": "candidate:\\ud800"}', "candidate"),
        ('{"v": 1, "type": "candidate", "candidate": "", "sdpMid": "\\ud800"}', "sdpMid"),
        ('{"v": 1, "type": "ping", "consult": "\\ud83d"}', "consult"),
        ('{"v": 1, "type": "record-consent", "agree": true, "request": "\\ud800"}', "request"),
        ('{"v": 1, "type": "report", "event": "stats", "detail": {"\\ud800": 1}}', "detail"),
    ],
)
def test_a_lone_surrogate_escape_in_a_text_field_is_refused(frame: str, field: str) -> None:
    """Found: a lone surrogate escape in a text field is now taken. msgspec's
    fast path refuses it, but ``_explain`` (meant only to name the problem)
    then accepts what json.loads made of it, so the offer, candidate, consent
    or report goes on (an offer or candidate relayed to the other browser as
    sent). The pydantic parser refused it with ``invalid_message`` naming the
    field, and tests/support/frames.py, the protocol's reading, says the same:
    "a lone surrogate is no text". The fast and slow paths now disagree."""
    refused = _refused(frame)
    assert refused.code is ErrorCode.INVALID_MESSAGE
    assert f"'{field}" in refused.message, refused.message


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"type": "record-consent", "agree": True, "by": "x" * 60_000}, "by"),
        ({"type": "report", "event": "x" * 60_000}, "event"),
        ({"type": "media-state", "camera": "x" * 60_000, "microphone": "on"}, "camera"),
        ({"type": "media-state", "camera": "on", "microphone": "x" * 60_000}, "microphone"),
    ],
)
def test_a_field_with_a_short_list_does_not_echo_a_huge_value(
    fields: dict[str, object], field: str
) -> None:
    """Found: msgspec's "Invalid enum value '...'" quotes the whole value, and
    ``_problem`` passes it on, so a 60 KB ``by``, ``event``, ``camera`` or
    ``microphone`` comes back in the error's message (60 KB per refused
    frame, 20 a second). The pydantic parser's message listed the allowed
    values only ("Input should be 'patient' or 'guardian'", 51 characters)."""
    refused = _refused(json.dumps({"v": 1, **fields}))
    assert refused.code is ErrorCode.INVALID_MESSAGE
    assert refused.message.startswith(f"field '{field}'"), refused.message[:100]
    assert len(refused.message) <= 300, len(refused.message)


@pytest.mark.parametrize(
    "name",
    ["sdp` - at `$.detail", "a` - at `$.b"],
)
def test_an_unknown_field_is_named_as_it_was_sent(name: str) -> None:
    """Found: ``_problem`` reads the path out of msgspec's text with a greedy
    regex, so an unknown field whose name holds " - at `$.x" is reported as
    the field 'x.<start of the name>': a frame with the unknown field
    "sdp` - at `$.detail" is told "field 'detail.sdp' is not part of a ping
    message", a field it never sent. The pydantic parser named the field as
    it was sent."""
    refused = _refused(json.dumps({"v": 1, "type": "ping", name: 1}))
    assert refused.code is ErrorCode.INVALID_MESSAGE
    assert refused.message == f"field {name!r} is not part of a ping message"
