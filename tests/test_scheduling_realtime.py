"""While recordings run, the loop's thread runs at the lowest real-time
priority where the process may (``recording.loop_realtime``,
signaling/scheduling.py): only that thread, never its later threads or the
recorder workers, and under the normal policy again with the last recording;
where it may not (no privilege, one CPU, an owner's own choice) it says why
once and falls back to the short slice."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import pytest

from config import Settings, load_settings
from server.app_keys import ROOMS
from signaling.scheduling import LoopSlice
from tests.support.databases import copy_sqlite_template
from tests.support.harness import Harness, Sockets
from tests.support.probe import python_lines, require_realtime
from tests.support.recording import both_see, consent_and_connect, start_call
from tests.support.settings import SettingsFactory

RR = os.SCHED_RR | os.SCHED_RESET_ON_FORK
OTHER = os.SCHED_OTHER | os.SCHED_RESET_ON_FORK


@pytest.fixture
def realtime_permitted() -> None:
    require_realtime()


# In a process of its own, so that the test process keeps its policy.
HELD = """
import os, threading
from signaling.scheduling import LoopSlice
held = LoopSlice(100, realtime=True)
held.busy(True)
print(os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
seen = []
thread = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
thread.start(); thread.join()
print(seen[0])
pid = os.fork()
if pid == 0:
    print(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
held.busy(False)
print(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
"""


def test_only_the_loops_thread_runs_at_realtime_priority_and_gives_it_back(
    realtime_permitted: None,
) -> None:
    out = python_lines(HELD)
    assert out[0] == f"{RR} 1", out  # the lowest real-time priority
    assert out[1] == f"{os.SCHED_OTHER}", out  # a thread started afterwards: normal
    assert out[2] == f"{os.SCHED_OTHER} 0", out  # a forked worker: normal
    assert out[3] == f"{OTHER} 0", out  # the last recording ended: normal again


UNPRIVILEGED = """
import os, resource
import structlog.testing
from signaling.scheduling import LoopSlice, slice_ns
resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
os.setgid(65534); os.setuid(65534)  # nobody: no CAP_SYS_NICE, no real-time limit
loop = LoopSlice(100, realtime=True)
with structlog.testing.capture_logs() as logs:
    for _ in range(3):
        loop.busy(True)
        busy = (os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK, slice_ns())
        loop.busy(False)
print(busy[0], busy[1])
print([(e["event"], e["reason"]) for e in logs])
"""


def test_without_the_right_it_says_so_once_and_takes_the_short_slice() -> None:
    if os.geteuid() != 0:
        # Not root: this process itself lacks the right (or has it through
        # LimitRTPRIO, which the probe cannot take away without root).
        pytest.skip("needs root to become an unprivileged user")
    out = python_lines(UNPRIVILEGED)
    assert out[0].split()[0] == str(os.SCHED_OTHER), out  # still normal
    assert out[0].split()[1] in {"100000", "None"}, out  # the short slice (None: kernel < 6.12)
    assert out[1] == str(
        [
            (
                "real-time priority not set",
                "not permitted: the process needs CAP_SYS_NICE or a real-time priority"
                " limit of 1 (LimitRTPRIO=1), and real-time time in its control group"
                " where the kernel divides it (CONFIG_RT_GROUP_SCHED)",
            )
        ]
    ), out


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        pytest.param(
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})",
            "the thread may run on one CPU only, which the recorder workers need too",
            id="one-cpu",
        ),
        # A real-time thread's children start at niceness 0 (reset on fork):
        # a server its owner ran at niceness 5 would start its workers above it.
        pytest.param(
            "os.nice(5)",
            "the thread runs at niceness 5, which the workers it starts would not keep",
            id="niceness",
        ),
        pytest.param(
            "os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))",
            "the thread does not run under the normal policy",
            id="batch",
        ),
    ],
)
def test_a_thread_set_apart_is_left_alone(setup: str, reason: str) -> None:
    before = python_lines(f"import os\n{setup}\nprint(os.sched_getscheduler(0))")[0]
    code = (
        f"import os\nfrom signaling.scheduling import request_realtime\n{setup}\n"
        "print(request_realtime()); print(os.sched_getscheduler(0))"
    )
    assert python_lines(code)[:2] == [reason, before]


def test_off_it_is_never_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[bool] = []
    monkeypatch.setattr("signaling.scheduling.request_realtime", lambda on=True: asked.append(on))
    monkeypatch.setattr("signaling.scheduling.request_slice", lambda us: None)
    loop = LoopSlice(100, realtime=False)
    loop.busy(True)
    loop.busy(False)
    assert asked == []


def test_the_default_is_on(data_dir: Path) -> None:
    settings = load_settings({"VIDEOCONSULT_DATA_DIR": str(data_dir)})
    assert settings.recording.loop_realtime is True


@pytest.fixture
def sqlite_settings(
    make_settings: SettingsFactory, sqlite_template: Path, data_dir: Path
) -> Settings:
    """The app's settings with real-time priority on, as in production."""
    copy_sqlite_template(sqlite_template, data_dir)
    return make_settings(recording_loop_realtime="true")


@pytest.mark.webrtc
@pytest.mark.recorder
async def test_a_recording_puts_the_loop_at_realtime_priority_and_not_its_worker(
    realtime_permitted: None, sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    # The app runs on the test's own loop, in this thread.
    assert os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_OTHER
    try:
        async with contextlib.AsyncExitStack() as stack:
            call = await start_call(sqlite_harness, sqlite_sockets, stack)
            # A consult alone: normal (an earlier recording test in this
            # worker may have left reset-on-fork set, with the slice).
            assert os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_OTHER
            await consent_and_connect(call)
            assert os.sched_getscheduler(0) == RR
            worker = sqlite_harness.app[ROOMS].recording.worker_pid(
                uuid.UUID(str(call.setup.consult_id))
            )
            assert worker is not None
            assert os.sched_getscheduler(worker) == os.SCHED_OTHER
            await call.therapist.send("record-stop")
            await both_see(call, "off")
            assert os.sched_getscheduler(0) == OTHER
    finally:
        # Whatever failed above, this test worker goes on as a normal thread.
        os.sched_setscheduler(0, OTHER, os.sched_param(0))
