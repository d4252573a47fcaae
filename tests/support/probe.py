"""Python run in a process of its own: for what a test must not do to its
own process, such as a thread's scheduling policy or niceness."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import ROOT
from tests.support.services import service_unavailable


def python_lines(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter from the repository's root (a
    failure fails the test) and return its output's lines."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split("\n")


def may_run_realtime() -> bool:
    """Whether a fresh process here may run a thread at real-time priority
    (signaling.scheduling.request_realtime: the right, two CPUs, niceness 0)."""
    code = "from signaling.scheduling import request_realtime as r; print(r())"
    return python_lines(code)[0] == "None"


def require_realtime() -> None:
    """Skip (under CI=true: fail) where this machine may not run a thread at
    real-time priority: CI runs as root on two cores; a developer's account
    may lack the right."""
    if len(os.sched_getaffinity(0)) < 2 or not may_run_realtime():
        service_unavailable(
            "real-time priority",
            "this process may not use it (root, CAP_SYS_NICE or LimitRTPRIO=1, and two CPUs)",
        )
