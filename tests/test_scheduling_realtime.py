"""While recordings run, the loop's thread runs at the lowest real-time
priority where the process may (``recording.loop_realtime``,
signaling/scheduling.py): only that thread, never its later threads or the
recorder workers, and under the normal policy again with the last recording;
where it may not (no privilege, one CPU, an owner's own choice) it says why
once and falls back to the short slice."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from config import Settings, load_settings
from server.app_keys import ROOMS
from signaling.scheduling import LoopSlice
from tests.support.databases import copy_sqlite_template
from tests.support.harness import Harness, Sockets
from tests.support.recording import both_see, consent_and_connect, start_call
from tests.support.services import service_unavailable
from tests.support.settings import SettingsFactory

RR = os.SCHED_RR | os.SCHED_RESET_ON_FORK
OTHER = os.SCHED_OTHER | os.SCHED_RESET_ON_FORK


def _may_run_realtime() -> bool:
    code = "from signaling.scheduling import request_realtime as r; print(r())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "None"


@pytest.fixture
def realtime_permitted() -> None:
    if len(os.sched_getaffinity(0)) < 2 or not _may_run_realtime():
        # CI runs as root on two cores; a developer's account may lack the right.
        service_unavailable(
            "real-time priority",
            "this process may not use it (root, CAP_SYS_NICE or LimitRTPRIO=1, and two CPUs)",
        )


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
    out = subprocess.run(
        [sys.executable, "-c", HELD], capture_output=True, text=True, check=True
    ).stdout.split("\n")
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
    out = subprocess.run(
        [sys.executable, "-c", UNPRIVILEGED],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.split("\n")
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


def test_a_thread_on_one_cpu_is_not_made_realtime(realtime_permitted: None) -> None:
    code = (
        "import os\nfrom signaling.scheduling import request_realtime\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "print(request_realtime()); print(os.sched_getscheduler(0))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:2] == [
        "the thread may run on one CPU only, which the recorder workers need too",
        str(os.SCHED_OTHER),
    ], out


def test_a_thread_at_another_niceness_is_left_alone(realtime_permitted: None) -> None:
    # A real-time thread's children start at niceness 0 (reset on fork):
    # a server its owner ran at niceness 5 would start its workers above it.
    code = (
        "import os\nfrom signaling.scheduling import request_realtime\n"
        "os.nice(5)\nprint(request_realtime()); print(os.sched_getscheduler(0))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:2] == [
        "the thread runs at niceness 5, which the workers it starts would not keep",
        str(os.SCHED_OTHER),
    ], out


def test_a_thread_its_owner_set_apart_is_left_alone() -> None:
    code = (
        "import os\nfrom signaling.scheduling import request_realtime\n"
        "os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))\n"
        "print(request_realtime()); print(os.sched_getscheduler(0) == os.SCHED_BATCH)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:2] == ["the thread does not run under the normal policy", "True"], out


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
