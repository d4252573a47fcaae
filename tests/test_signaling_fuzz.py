"""Random and malformed frames at the socket: the server stays up, other consults untouched."""

from __future__ import annotations

import json
import uuid

import pytest
from aiohttp import WSMsgType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.harness import Harness, Sockets, new_consult, receive

# Each harness test runs on the in-process broker and on the real Redis.
# Each run sends thousands of random frames: seconds, not milliseconds.
pytestmark = [pytest.mark.signaling_backends, pytest.mark.slow]

VICTIM = "__victim_consult__"

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Messages that look almost right: known types with random fields, some of
# them naming the other consult.
ALMOST = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 2, "1", None]),
        "type": st.sampled_from(
            ["offer", "answer", "candidate", "admit", "deny", "end", "bye", "ping", "x", ""]
        ),
    },
    optional={
        "sdp": JSON_VALUES,
        "candidate": JSON_VALUES,
        "sdpMLineIndex": JSON_VALUES,
        "consult": st.sampled_from([VICTIM]) | JSON_VALUES,
    },
).map(json.dumps)
FRAMES = st.one_of(
    st.text(max_size=300),
    JSON_VALUES.map(json.dumps),
    ALMOST,
    st.binary(max_size=64),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(frames=st.lists(FRAMES, min_size=1, max_size=20))
async def test_random_frames_never_harm_the_server_or_another_consult(
    sqlite_harness: Harness, sqlite_sockets: Sockets, frames: list[str | bytes]
) -> None:
    # The fixtures live across examples: fresh accounts for each one.
    run = uuid.uuid4().hex[:12]
    sqlite_harness.client.session.cookie_jar.clear()
    victim = await new_consult(sqlite_harness, email=f"v{run}@praktijk-noord.example")
    calm = await sqlite_sockets.therapist(victim.consult_id)
    await receive(calm, "welcome")

    sqlite_harness.client.session.cookie_jar.clear()
    attacker = await new_consult(sqlite_harness, email=f"a{run}@praktijk-noord.example")
    noisy = await sqlite_sockets.therapist(attacker.consult_id)
    await receive(noisy, "welcome")
    for frame in frames:
        if isinstance(frame, bytes):
            await noisy.send_bytes(frame)
        else:
            await noisy.send_str(frame.replace(VICTIM, victim.consult_id))
        # Every frame is answered, or the socket is closed: follow it with a
        # ping and read until the pong (or the close).
        await noisy.send_json({"v": 1, "type": "ping"})
        while True:
            message = await noisy.receive(timeout=5)
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                break
            assert message.type is WSMsgType.TEXT
            if json.loads(message.data)["type"] == "pong":
                break
        if noisy.closed:
            break

    # Nothing reached the other consult, which still works.
    await calm.send_json({"v": 1, "type": "ping"})
    assert (await calm.receive_json(timeout=5))["type"] == "pong"
    assert (await sqlite_harness.client.get("/healthz")).status == 200
    await noisy.close()
    await calm.close()
