"""Random and malformed frames, and the consult life cycle as a state machine.

``test_random_frames_never_harm_the_server_or_another_consult`` throws random
frames at one socket next to another consult. ``test_the_consult_life_cycle_
keeps_to_protocol_md`` runs :class:`~tests.support.consult_machine.ConsultLifeCycle`:
two consults through connects, admission, relays, drops, reconnects, second
devices, ends, recording requests and random frames, every message checked
against the model after every step. CI runs a bounded number of examples;
``bench/protocol_fuzz.py`` runs the same test for 100,000 frames and more
(docs/benchmarks.md, "Protocol fuzzing").
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import WSMsgType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from tests.support.consult_machine import ConsultLifeCycle, FuzzWorld, prepare_world
from tests.support.frames import FRAMES, placed
from tests.support.harness import Harness, Sockets, new_consult, receive

# Each harness test runs on the in-process broker and on the real Redis.
# Each run sends thousands of frames: seconds, not milliseconds.
pytestmark = [pytest.mark.signaling_backends, pytest.mark.slow]

# The deep run (bench/protocol_fuzz.py): at least this many frames, within
# these minutes, the figures written as JSON into this directory.
DEEP_FRAMES = int(os.environ.get("VIDEOCONSULT_FUZZ_FRAMES", "0"))
DEEP_MINUTES = float(os.environ.get("VIDEOCONSULT_FUZZ_MINUTES", "20"))
DEEP_STATS = os.environ.get("VIDEOCONSULT_FUZZ_STATS", "")
DEEP_STEPS = int(os.environ.get("VIDEOCONSULT_FUZZ_STEPS", "60"))


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
        placed_frame = placed(frame, attacker.consult_id, victim.consult_id)
        if isinstance(placed_frame, bytes):
            await noisy.send_bytes(placed_frame)
        else:
            await noisy.send_str(placed_frame)
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


def test_the_consult_life_cycle_keeps_to_protocol_md(
    sqlite_backend: str, sqlite_template: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis_url = request.getfixturevalue("redis_url") if sqlite_backend == "redis" else None
    world = prepare_world(sqlite_template, tmp_path, redis_url)
    machine = type("ConsultLifeCycleHere", (ConsultLifeCycle,), {"world": world})
    if not DEEP_FRAMES:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=20,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
        return
    deep_run(machine, world, sqlite_backend)


def deep_run(machine: type[ConsultLifeCycle], world: FuzzWorld, backend: str) -> None:
    """Rounds of examples until DEEP_FRAMES frames were sent or DEEP_MINUTES passed
    (a round starts only before then); the figures go to DEEP_STATS."""
    started = time.monotonic()
    deadline = started + DEEP_MINUTES * 60
    failure: BaseException | None = None
    rounds = 0
    try:
        while world.stats.frames < DEEP_FRAMES and time.monotonic() < deadline:
            rounds += 1
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=50,
                    stateful_step_count=DEEP_STEPS,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                ),
            )
    except BaseException as err:
        failure = err
        raise
    finally:
        if DEEP_STATS:
            figures = {
                "backend": backend,
                "rounds": rounds,
                "wall_s": round(time.monotonic() - started, 1),
                "failures": 0 if failure is None else 1,
                "failure": None if failure is None else f"{type(failure).__name__}: {failure}",
                **world.stats.as_dict(),
            }
            Path(DEEP_STATS).mkdir(parents=True, exist_ok=True)
            (Path(DEEP_STATS) / f"{backend}.json").write_text(json.dumps(figures, indent=2))
