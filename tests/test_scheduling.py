"""The event loop's thread asks Linux for a short time slice
(``server.scheduler_slice_us``, server/scheduling.py): the thread that runs
the loop gets it, and nothing it starts does: not its other threads, not
the recorder and bulk workers it forks or spawns."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from config import SettingsError, load_settings
from server.scheduling import slice_ns
from tests.support.processes import ServerProcess

SHORT_NS = 100_000

# In a process of its own, so that the test process keeps its slice.
PROBE = """
import os, threading
from server.scheduling import request_slice, slice_ns
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
            "from server.scheduling import *; request_slice(100); print(slice_ns())",
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
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "None", out  # granted
    assert out[1] == f"{SHORT_NS} 3", out  # the slice, the niceness kept
    assert out[2] == str(default), out  # a thread started afterwards: the default
    assert out[3] == f"{default} 3", out  # a forked worker: the default, its niceness


def test_the_slice_of_a_thread_that_is_not_there_cannot_be_read() -> None:
    assert slice_ns(2**22 + 12345) is None  # beyond pid_max's largest default


def test_a_thread_under_another_policy_is_left_alone() -> None:
    code = (
        "import os\nfrom server.scheduling import request_slice\n"
        "os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))\n"
        "print(request_slice(100)); print(os.sched_getscheduler(0) == os.SCHED_BATCH)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:2] == ["the thread does not run under the normal policy", "True"]


@pytest.mark.parametrize("value", ["1", "99", "100001", "-1"])
def test_a_slice_the_kernel_would_not_grant_is_refused_by_name(value: str, data_dir: Path) -> None:
    environ = {
        "VIDEOCONSULT_DATA_DIR": str(data_dir),
        "VIDEOCONSULT_SERVER_SCHEDULER_SLICE_US": value,
    }
    with pytest.raises(SettingsError, match="scheduler_slice_us"):
        load_settings(environ)


def test_the_default_is_the_shortest_slice(data_dir: Path) -> None:
    settings = load_settings({"VIDEOCONSULT_DATA_DIR": str(data_dir)})
    assert settings.server.scheduler_slice_us == 100


def _threads(pid: int) -> dict[int, str]:
    tasks = Path(f"/proc/{pid}/task")
    return {int(tid.name): (tid / "comm").read_text().strip() for tid in tasks.iterdir()}


@needs_slices
@pytest.mark.multinode
@pytest.mark.parametrize(("setting", "loop_slice"), [(None, SHORT_NS), ("0", None)])
async def test_the_server_s_loop_thread_has_the_slice_and_its_other_threads_not(
    setting: str | None, loop_slice: int | None, data_dir: Path, free_port: int, tmp_path: Path
) -> None:
    default = slice_ns()
    settings = {} if setting is None else {"server_scheduler_slice_us": setting}
    server = ServerProcess(data_dir, free_port, tmp_path / "server.log", settings=settings)
    try:
        await asyncio.to_thread(server.wait_healthy)
        pid = server.process.pid
        threads = _threads(pid)
        assert len(threads) > 1, threads  # the loop-lag watcher at least
        assert slice_ns(pid) == (loop_slice or default)
        others = {tid: slice_ns(tid) for tid in threads if tid != pid}
        assert set(others.values()) == {default}, (threads, others)
    finally:
        server.stop()
    assert "scheduler slice not set" not in (tmp_path / "server.log").read_text()
