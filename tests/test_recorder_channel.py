"""The channel to a recorder worker: its lines, and what crosses it
(signaling/recorder_channel.py)."""

from __future__ import annotations

import uuid

import pytest

from audit.recordings import RecordingFile
from signaling.protocol import ParticipantRole
from signaling.recorder_channel import (
    ChannelError,
    Op,
    decode,
    encode,
    file_from_wire,
    file_to_wire,
    roles_from_wire,
    roles_to_wire,
)


def test_a_message_is_one_line_and_reads_back() -> None:
    line = encode({"id": 1, "op": Op.ACCEPT_OFFER, "sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"})
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert decode(line) == {
        "id": 1,
        "op": "accept_offer",
        "sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n",
    }


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b'"text"\n'])
def test_a_line_that_is_no_message_is_refused(line: bytes) -> None:
    with pytest.raises(ChannelError):
        decode(line)


def test_a_recording_file_crosses_whole() -> None:
    file = RecordingFile("/data/recordings/x.vcenc", uuid.uuid4(), bytes(range(32)))
    assert file_from_wire(decode(encode(file_to_wire(file)))) == file


def test_a_recording_file_without_its_key_is_refused() -> None:
    with pytest.raises(ChannelError):
        file_from_wire({"path": "/x", "file_id": str(uuid.uuid4())})


def test_roles_cross_whole_and_unknown_ones_are_refused() -> None:
    both = frozenset(ParticipantRole)
    assert roles_from_wire(roles_to_wire(both)) == both
    with pytest.raises(ChannelError):
        roles_from_wire(["guest"])
