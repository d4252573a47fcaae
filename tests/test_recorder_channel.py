"""The channel to a recorder worker: its lines, and what crosses it
(signaling/recorder_channel.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from audit.recordings import RecordingFile
from signaling.protocol import ParticipantRole
from signaling.recorder_channel import (
    MAX_LINE_BYTES,
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


async def forwarded(*lines: bytes) -> list[Any]:
    """What the server logs of a worker's stderr lines."""
    from structlog.testing import capture_logs

    from signaling.recorder_proxy import WorkerRecorder

    async def no_failure(*_args: object) -> None:
        return None

    stderr = asyncio.StreamReader(limit=MAX_LINE_BYTES)  # the worker's stderr's
    for line in lines:
        stderr.feed_data(line + b"\n")
    stderr.feed_eof()
    with capture_logs() as logs:
        await WorkerRecorder(on_failure=no_failure)._forward_log(stderr, 4242)
    return logs


async def test_odd_worker_log_lines_never_stop_the_forwarding() -> None:
    # Found in review: a line with its own worker_pid raised TypeError and
    # ended the forwarding for good (the worker's pipe would then fill up and
    # block it); an overlong JSON line went whole through the redaction.
    logs = await forwarded(
        json.dumps({"event": "one", "level": "info", "worker_pid": 1}).encode(),
        json.dumps({"event": "two", "level": "no-such-level"}).encode(),
        json.dumps({"event": "three", "detail": "x" * 100_000}).encode(),
        b"a traceback line",
        json.dumps({"event": "last", "level": "warning"}).encode(),
    )
    events = [entry["event"] for entry in logs]
    assert events == ["one", "two", "recorder worker output", "recorder worker output", "last"]
    assert all(entry["worker_pid"] == 4242 for entry in logs)
    assert len(str(logs[2]["line"])) <= 500  # cut, then passed on as text


async def test_a_flood_of_worker_log_lines_is_cut_to_a_rate() -> None:
    from signaling.recorder_proxy import MAX_LOG_LINES_PER_S

    logs = await forwarded(*(b'{"event": "noise"}' for _ in range(MAX_LOG_LINES_PER_S * 4)))
    noise = [entry for entry in logs if entry["event"] == "noise"]
    dropped = [entry for entry in logs if entry["event"] == "recorder worker: log lines dropped"]
    # All within a second or two of the test's clock: at most two seconds' worth.
    assert MAX_LOG_LINES_PER_S <= len(noise) <= 2 * MAX_LOG_LINES_PER_S
    assert dropped  # said, not silently lost
    said_dropped = sum(int(entry["lines"]) for entry in dropped)
    assert len(noise) + said_dropped == 4 * MAX_LOG_LINES_PER_S
