"""The inbound messages as :func:`signaling.protocol.parse_inbound` reads
them (msgspec since issue 19): the right class and fields for a good frame,
and for a bad one an error whose message names the field and the problem."""

from __future__ import annotations

import json

import pytest

from signaling.protocol import (
    INBOUND_TYPES,
    Candidate,
    ErrorCode,
    Offer,
    ProtocolError,
    RecordConsent,
    Report,
    parse_inbound,
)


def test_a_good_frame_gives_its_class_with_its_type_and_fields() -> None:
    candidate = parse_inbound(
        '{"v": 1, "type": "candidate", "candidate": "candidate:1 1 udp 1 192.0.2.1 9 typ host",'
        ' "sdpMid": "0", "sdpMLineIndex": 0}'
    )
    assert isinstance(candidate, Candidate)
    assert (candidate.type, candidate.sdpMid, candidate.sdpMLineIndex) == ("candidate", "0", 0)
    assert candidate.consult is None
    offer = parse_inbound('{"v": 1, "type": "offer", "sdp": "v=0\\r\\n", "consult": "c"}')
    assert isinstance(offer, Offer)
    assert (offer.type, offer.sdp, offer.consult) == ("offer", "v=0\r\n", "c")
    consent = parse_inbound('{"v": 1, "type": "record-consent", "agree": true}')
    assert isinstance(consent, RecordConsent)
    assert (consent.agree, consent.by, consent.request) == (True, "patient", None)
    # Every type the protocol lists parses to a message of that type.
    assert len(INBOUND_TYPES) == 14
    for kind in ("ping", "admit", "deny", "end", "bye", "record-request", "record-stop"):
        assert parse_inbound(json.dumps({"v": 1, "type": kind})).type == kind


def test_a_report_keeps_a_large_integer_as_the_float_a_browser_has() -> None:
    report = parse_inbound(
        '{"v": 1, "type": "report", "event": "stats",'
        ' "detail": {"bytes": 123456789012345678901234567890, "ok": true, "rtt": 0.25}}'
    )
    assert isinstance(report, Report)
    assert report.detail == {"bytes": 1.2345678901234568e29, "ok": True, "rtt": 0.25}
    assert type(report.detail["bytes"]) is float
    # Each report has a detail of its own.
    first = parse_inbound('{"v": 1, "type": "report", "event": "stats"}')
    second = parse_inbound('{"v": 1, "type": "report", "event": "stats"}')
    assert isinstance(first, Report)
    assert isinstance(second, Report)
    assert first.detail == {}
    assert first.detail is not second.detail


@pytest.mark.parametrize(
    ("frame", "code", "message"),
    [
        ("[1]", ErrorCode.INVALID_JSON, "the message must be a JSON object"),
        ('{"v": 1, "type": "ping"', ErrorCode.INVALID_JSON, "the message is not valid JSON"),
        ('{"v": true, "type": "ping"}', ErrorCode.UNSUPPORTED_VERSION, "field 'v' must be 1"),
        ('{"v": 1.0, "type": "ping"}', ErrorCode.UNSUPPORTED_VERSION, "field 'v' must be 1"),
        ('{"v": 1, "type": "nope"}', ErrorCode.UNKNOWN_TYPE, "unknown message type"),
        # A relayed frame goes on as it came: a second "type" (which a
        # browser's JSON.parse would take) must not pass as a candidate.
        (
            '{"v": 1, "type": "candidate", "candidate": "x", "type": "consult-ended"}',
            ErrorCode.UNKNOWN_TYPE,
            "unknown message type",
        ),
        (
            '{"v": 1, "type": "candidate", "type": "offer", "candidate": "x"}',
            ErrorCode.INVALID_MESSAGE,
            "field 'candidate' is not part of an offer message",
        ),
        (
            '{"v": 1, "type": "ping", "extra": true}',
            ErrorCode.INVALID_MESSAGE,
            "field 'extra' is not part of a ping message",
        ),
        (
            '{"v": 1, "type": "offer"}',
            ErrorCode.INVALID_MESSAGE,
            "field 'sdp' is required in an offer message",
        ),
        (
            '{"v": 1, "type": "offer", "sdp": 5}',
            ErrorCode.INVALID_MESSAGE,
            "field 'sdp': Expected `str`, got `int`",
        ),
        (
            '{"v": 1, "type": "offer", "sdp": ""}',
            ErrorCode.INVALID_MESSAGE,
            "field 'sdp': Expected `str` of length >= 1",
        ),
        (
            '{"v": 1, "type": "candidate", "candidate": "x", "sdpMLineIndex": -1}',
            ErrorCode.INVALID_MESSAGE,
            "field 'sdpMLineIndex': Expected `int` >= 0",
        ),
        (
            '{"v": 1, "type": "ping", "consult": "' + "c" * 65 + '"}',
            ErrorCode.INVALID_MESSAGE,
            "field 'consult': Expected `str` of length <= 64",
        ),
        (
            '{"v": 1, "type": "record-consent", "agree": true, "by": "aunt"}',
            ErrorCode.INVALID_MESSAGE,
            "field 'by': expected one of guardian, patient",
        ),
        (
            '{"v": 1, "type": "report", "event": "gossip"}',
            ErrorCode.INVALID_MESSAGE,
            "field 'event': expected one of call-failed,",
        ),
        (
            '{"v": 1, "type": "report", "event": "stats", "detail": {"' + "k" * 41 + '": 1}}',
            ErrorCode.INVALID_MESSAGE,
            "field 'detail': a field's name: Expected `str` of length <= 40",
        ),
        (
            '{"v": 1, "type": "report", "event": "stats", "detail": '
            + json.dumps({f"k{i}": i for i in range(21)})
            + "}",
            ErrorCode.INVALID_MESSAGE,
            "field 'detail': Expected `object` of length <= 20",
        ),
        (
            '{"v": 1, "type": "report", "event": "stats", "detail": {"a": {"b": 1}}}',
            ErrorCode.INVALID_MESSAGE,
            "field 'detail.a': must be a string of at most 200 characters",
        ),
    ],
)
def test_a_bad_frame_is_refused_with_the_field_and_the_problem(
    frame: str, code: ErrorCode, message: str
) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_inbound(frame)
    assert refused.value.code is code
    assert refused.value.message.startswith(message), refused.value.message
