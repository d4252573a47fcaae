"""How the Redis implementations write deliveries and room states: the
codec on its own (pure; no Redis needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from signaling.ports import Delivery
from signaling.redis.codec import (
    decode_delivery,
    decode_room_state,
    encode_delivery,
    encode_room_state,
)
from signaling.state import Link, Presence, RecordingPhase, RoomPhase, RoomState

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def test_a_delivery_survives_encoding_with_all_its_fields() -> None:
    plain = Delivery({"type": "denied", "v": 1}, connection_id="c-1", close_code=4003)
    assert decode_delivery(encode_delivery(plain)) == plain
    # A relayed frame keeps its exact text, newlines included, not re-encoded.
    relayed = Delivery({"type": "offer"}, text='{"type":"offer",\n "sdp":"v=0\\r\\n"}')
    assert decode_delivery(encode_delivery(relayed)) == relayed
    assert encode_delivery(relayed).endswith(relayed.text or "")


def test_a_malformed_delivery_is_refused() -> None:
    with pytest.raises(ValueError, match="message object"):
        decode_delivery('{"message": 3}')
    with pytest.raises(ValueError, match="close_code is a str"):
        decode_delivery('{"message": {}, "close_code": "1000"}')


def sample_state() -> RoomState:
    return RoomState(
        phase=RoomPhase.ACTIVE,
        therapist=Presence("t-1", node="node-a"),
        patient=Presence(
            "p-1", link=Link.RECONNECTING, left_at=NOW + timedelta(seconds=3), node="node-b"
        ),
        recording=RecordingPhase.REQUESTED,
        keep_until=NOW + timedelta(days=3),
    )


def test_a_room_state_saved_with_a_label_reads_without_it() -> None:
    """Rooms once kept the therapist's label in their state; a state saved so
    (by an older version, still in Redis until its invite runs out) reads as
    the same room without it, and is saved again without it."""
    old = (
        '{"phase":"waiting","therapist":null,"patient":null,"display_name":"Mevr. J.",'
        '"recording":"off","keep_until":null}'
    )
    state = decode_room_state(old)
    assert state == RoomState()
    assert "Mevr. J." not in encode_room_state(state)
    # Whatever the old field held: it is not looked at.
    assert decode_room_state('{"phase": "active", "display_name": 3}').phase is RoomPhase.ACTIVE


def test_room_state_survives_the_round_trip_and_garbage_is_refused() -> None:
    state = sample_state()
    assert decode_room_state(encode_room_state(state)) == state
    assert decode_room_state(encode_room_state(RoomState())) == RoomState()
    for garbage in (
        "[]",
        '{"phase": "dancing"}',
        '{"phase": "active", "therapist": {"connection": 7, "link": "connected"}}',
        '{"phase": "active", "patient": {"connection": "p", "link": "gone"}}',
        '{"phase": "active", "keep_until": "2026-11-23T09:00:00"}',  # no time zone
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each is a different problem
            decode_room_state(garbage)
