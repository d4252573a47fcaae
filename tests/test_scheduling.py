"""While recordings run on the node, the event loop's thread asks Linux for
a short time slice (``recording.loop_slice_us``, signaling/scheduling.py):
the thread that runs the loop gets it, and nothing it starts does, not its
other threads, not the recorder workers; without recordings it has the
kernel's default again."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import structlog.testing

from config import SettingsError, load_settings
from server.app_keys import ROOMS
from signaling.scheduling import LoopSlice, slice_ns
from tests.support.harness import Harness, Sockets
from tests.support.probe import python_lines
from tests.support.recording import both_see, consent_and_connect, start_call

SHORT_NS = 100_000

# In a process of its own, so that the test process keeps its slice.
PROBE = """
import os, threading
from signaling.scheduling import request_slice, slice_ns
os.nice(3)
print(request_slice(100))
print(slice_ns(), os.getpriority(os.PRIO_PROCESS, 0))
seen = []
thread = threading.Thread(target=lambda: seen.append(slice_ns()))
thread.start(); thread.join()
print(seen[0])
pid = os.fork()
if pid == 0:
    print(slice_ns(), os.getpriority(os.PRIO_PROCESS, 0), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def _kernel_takes_slices() -> bool:
    # A probe of its own: an older kernel accepts the request and ignores it.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from signaling.scheduling import *; request_slice(100); print(slice_ns())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return probe.stdout.strip() == str(SHORT_NS)


needs_slices = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _kernel_takes_slices(),
    reason="the kernel ignores a SCHED_OTHER thread's sched_runtime (Linux before 6.12)",
)


@needs_slices
def test_only_the_calling_thread_gets_the_slice_and_keeps_its_niceness() -> None:
    default = slice_ns()
    assert default is not None
    assert default != SHORT_NS
    out = python_lines(PROBE)
    assert out[0] == "None", out  # granted
    assert out[1] == f"{SHORT_NS} 3", out  # the slice, the niceness kept
    assert out[2] == str(default), out  # a thread started afterwards: the default
    assert out[3] == f"{default} 3", out  # a forked worker: the default, its niceness


def test_the_slice_of_a_thread_that_is_not_there_cannot_be_read() -> None:
    assert slice_ns(2**22 + 12345) is None  # beyond pid_max's largest default


def test_a_thread_under_another_policy_is_left_alone() -> None:
    code = (
        "import os\nfrom signaling.scheduling import request_slice\n"
        "os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))\n"
        "print(request_slice(100)); print(os.sched_getscheduler(0) == os.SCHED_BATCH)"
    )
    out = python_lines(code)
    assert out[:2] == ["the thread does not run under the normal policy", "True"]


@pytest.mark.parametrize("value", ["1", "99", "100001", "-1"])
def test_a_slice_the_kernel_would_not_grant_is_refused_by_name(value: str, data_dir: Path) -> None:
    environ = {
        "VIDEOCONSULT_DATA_DIR": str(data_dir),
        "VIDEOCONSULT_RECORDING_LOOP_SLICE_US": value,
    }
    with pytest.raises(SettingsError, match="loop_slice_us"):
        load_settings(environ)


def test_the_default_is_the_shortest_slice(data_dir: Path) -> None:
    settings = load_settings({"VIDEOCONSULT_DATA_DIR": str(data_dir)})
    assert settings.recording.loop_slice_us == 100


BUSY = """
from signaling.scheduling import LoopSlice, slice_ns
default = slice_ns()
held, never = LoopSlice(100), LoopSlice(0)
never.busy(True); print(slice_ns() == default)
held.busy(True); held.busy(True); print(slice_ns())
held.busy(False); print(slice_ns() == default)
held.busy(False); print(slice_ns() == default)
"""


@needs_slices
def test_the_loop_holds_the_slice_while_busy_and_gives_it_back() -> None:
    out = python_lines(BUSY)
    assert out[:4] == ["True", str(SHORT_NS), "True", "True"], out


@needs_slices
@pytest.mark.webrtc
@pytest.mark.recorder
async def test_the_loop_has_the_slice_while_a_recording_runs_and_the_worker_not(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    # The app runs on the test's own loop, in this thread.
    default = slice_ns()
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        assert slice_ns() == default  # a consult alone: the default
        await consent_and_connect(call)
        assert slice_ns() == SHORT_NS
        worker = sqlite_harness.app[ROOMS].recording.worker_pid(
            uuid.UUID(str(call.setup.consult_id))
        )
        assert worker is not None
        assert slice_ns(worker) == default
        await call.therapist.send("record-stop")
        await both_see(call, "off")
        assert slice_ns() == default


def test_a_refused_slice_is_logged_once_and_signaling_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("signaling.scheduling._syscalls", lambda: None)  # as on macOS
    loop_slice = LoopSlice(100)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            loop_slice.busy(True)
            loop_slice.busy(False)
    refusals = [entry for entry in logs if entry["event"] == "scheduler slice not set"]
    assert len(refusals) == 1, logs
    assert refusals[0]["reason"].startswith("not supported on")
