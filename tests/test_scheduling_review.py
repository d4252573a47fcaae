"""Found in review of the loop's short time slice (signaling/scheduling.py,
recording.loop_slice_us); each test failed before its fix: a scheduler call
that fails (musl libc, a sandbox) broke recordings; a negative niceness was
taken from the workers by reset-on-fork; the documented default slice was
not the kernel's."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import structlog.testing

from signaling.scheduling import LoopSlice
from tests.support.harness import Harness, Sockets
from tests.support.recording import both_see, consent_and_connect, start_call
from tests.test_scheduling import needs_slices

ROOT = Path(__file__).resolve().parent.parent


def _no_sched_getscheduler(_pid: int) -> int:
    # What musl libc (Alpine's Python) answers for every call, and what a
    # seccomp filter refusing the call with ENOSYS/EPERM looks like.
    raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


# --- 1. An OSError while asking is raised, not reported -----------------------


def test_a_scheduler_call_that_fails_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The module promises: "elsewhere (not Linux, a sandbox refusing the
    # call) nothing changes and request_slice says so"; the docs: "one log
    # line says so and signaling goes on". os.sched_getscheduler raises
    # instead, and LoopSlice.busy with it.
    monkeypatch.setattr(os, "sched_getscheduler", _no_sched_getscheduler)
    loop_slice = LoopSlice(100)
    with structlog.testing.capture_logs() as logs:
        loop_slice.busy(True)
        loop_slice.busy(False)
    (refused,) = [entry for entry in logs if entry["event"] == "scheduler slice not set"]
    assert refused["reason"] == "the thread's scheduling cannot be read: Function not implemented"


@pytest.mark.webrtc
@pytest.mark.recorder
async def test_a_recording_starts_and_stops_where_the_policy_cannot_be_read(
    sqlite_harness: Harness, sqlite_sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On musl every consent's busy(True) raises inside RecordingControl._consent,
    # after the recording was put in _live (its worker launched) and before its
    # starter task exists: the consent fails, and what is in _live never leaves.
    monkeypatch.setattr(os, "sched_getscheduler", _no_sched_getscheduler)
    async with contextlib.AsyncExitStack() as stack:
        call = await start_call(sqlite_harness, sqlite_sockets, stack)
        await consent_and_connect(call)
        await call.therapist.send("record-stop")
        await both_see(call, "off")


# --- 2. RESET_ON_FORK takes a negative niceness from later threads/processes --

NEGATIVE_NICE = """
import os, subprocess, sys, threading
from signaling.scheduling import LoopSlice
os.setpriority(os.PRIO_PROCESS, 0, -5)
loop_slice = LoopSlice(100)
loop_slice.busy(True)   # a recording starts
loop_slice.busy(False)  # and ends: the kernel's default again
seen = []
thread = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
thread.start(); thread.join()
child = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
    capture_output=True, text=True, check=True,
).stdout.strip()
print(os.getpriority(os.PRIO_PROCESS, 0), seen[0], child)
"""


def _can_lower_niceness() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import os; os.setpriority(os.PRIO_PROCESS, 0, -5)"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _can_lower_niceness(),
    reason="needs Linux and CAP_SYS_NICE (or RLIMIT_NICE) to run at a negative niceness",
)
def test_after_the_recordings_threads_and_workers_keep_a_negative_niceness() -> None:
    # A node run at nice -5 (systemd Nice=-5): after one recording has come
    # and gone, the loop's thread keeps SCHED_RESET_ON_FORK for good, and
    # every thread (the executor's) and process (recorder and bulk-job
    # workers) it starts from then on runs at nice 0, not -5.
    lines = subprocess.run(
        [sys.executable, "-c", NEGATIVE_NICE],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.splitlines()
    out = lines[-1].split()
    assert out == ["-5", "-5", "-5"], f"loop, new thread, new process: {out}"
    # The slice is not asked for, and the one log line says why.
    assert "niceness -5" in "\n".join(lines[:-1]), lines


# --- 3. The documented default slice is not the kernel's ----------------------


@needs_slices
def test_the_documented_default_slice_is_the_kernels() -> None:
    # configuration.md (and defaults.toml, the module docstring) give the
    # default as 0.75 to 3 ms; Linux has had 0.70 ms times (1 + log2 CPUs, at
    # most 8), so 0.7 to 2.8 ms, since before 6.12, the first to take a slice.
    default_ns = int(
        subprocess.run(
            [sys.executable, "-c", "from signaling.scheduling import slice_ns; print(slice_ns())"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
    )
    row = next(
        line
        for line in (ROOT / "docs" / "configuration.md").read_text().splitlines()
        if line.startswith("| `recording.loop_slice_us`")
    )
    found = re.search(r"kernel's default, ([\d.]+) to ([\d.]+) ms by the number of cores", row)
    assert found is not None, row
    low_ms, high_ms = float(found[1]), float(found[2])
    factor = 1 + int(math.log2(min(os.cpu_count() or 1, 8)))
    assert (round(low_ms * 1e6) * factor, round(low_ms * 4e6)) == (
        default_ns,
        round(high_ms * 1e6),
    ), f"documented {low_ms} to {high_ms} ms; this kernel's default {default_ns} ns"
