"""The event loop's thread asks Linux for a short time slice while
recordings run on the node, so that it gets a core at once when a message
wakes it (``recording.loop_slice_us``).

On a node that records consults, the loop often wakes while the recorder
workers keep the cores busy. Since Linux 6.6 the scheduler (EEVDF) lets a
waking task take a core from a running one only when its deadline is
earlier, and since 6.12 a task may ask for a slice of its own
(``sched_setattr``, ``sched_runtime``): a shorter slice means an earlier
deadline. Asked for with 0.1 ms (the shortest there is; the default is 0.7
to 2.8 ms by the number of cores), the loop preempts the recorder workers when
it wakes, and hands the core back after at most as long. Its share of the
CPU stays what its niceness gives it; only when it runs changes. That has a
price when the loop itself is busy: it is preempted more often, and a
relayed message cost a sixth more CPU with the short slice in the ping-pong
benchmark. So the loop holds the slice only while recordings run
(:class:`LoopSlice`; docs/benchmarks.md, "The loop's own time slice").

Only the calling thread gets the slice: the request carries
``SCHED_FLAG_RESET_ON_FORK``, so threads and processes started afterwards
(the executor's threads, the recorder workers) keep the default.
On an older kernel the slice is accepted and ignored; elsewhere (not Linux,
a sandbox refusing the call, a thread under another policy or at a negative
niceness) nothing changes and :func:`request_slice` says so.

Where the process may (``CAP_SYS_NICE``, or a real-time priority limit of
at least 1: systemd's ``LimitRTPRIO=1``) and the thread has two CPUs or more,
the loop's thread instead runs at the lowest real-time priority while
recordings run (``recording.loop_realtime``, :func:`request_realtime`): then
it takes a core from any normal thread the moment it wakes, whatever their
deadlines. The kernel still leaves normal threads 5 % of each CPU, and a
loop that holds one core leaves the workers the others; on a single CPU it
is not asked for. Measured end to end with ten recordings, the short
slice left the paced p99 at about three times the p99 without; the loop at
real-time priority brought it to 0.96 times, with the benchmark's load
generator (which stands for remote browsers) at real-time priority too;
with the generator sharing the cores normally, 2 to 3 times either way
(docs/benchmarks.md, "The loop at real-time priority").
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

import structlog

_log = structlog.get_logger("videoconsult.server")

# sched_setattr(2) and sched_getattr(2); Python's os module has neither.
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
SCHED_OTHER = 0
SCHED_FLAG_RESET_ON_FORK = 0x01
# sched_getscheduler's policy carries it as this bit once set.
SCHED_RESET_ON_FORK = 0x40000000


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr`` (include/uapi/linux/sched/types.h), its first size."""

    _fields_ = (
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    )


def _syscalls() -> tuple[int, int] | None:
    # platform.machine() is the kernel's: a 32-bit interpreter on a 64-bit
    # kernel has other numbers (314 is sync_file_range on i386).
    if not sys.platform.startswith("linux") or sys.maxsize < 2**32:
        return None
    return _SYSCALLS.get(platform.machine())


def request_slice(slice_us: int) -> str | None:
    """Ask for a slice of ``slice_us`` µs for the calling thread (a normal
    thread, at its niceness; 0: the kernel's default again); None when
    granted, else why not."""
    numbers = _syscalls()
    if numbers is None:
        bits = sys.maxsize.bit_length() + 1
        return f"not supported on {sys.platform} {platform.machine()} ({bits}-bit Python)"
    try:
        policy = os.sched_getscheduler(0) & ~SCHED_RESET_ON_FORK
        nice = os.getpriority(os.PRIO_PROCESS, 0)  # the calling thread's on Linux
    except OSError as err:
        # musl libc answers ENOSYS to sched_getscheduler; so may a sandbox.
        return f"the thread's scheduling cannot be read: {err.strerror}"
    if policy != SCHED_OTHER:
        # Real-time or batch: its owner chose; a slice would reset the policy.
        return "the thread does not run under the normal policy"
    if nice < 0:
        # Its owner raised its priority: with reset-on-fork every thread and
        # process started from then on would run at 0 instead.
        return f"the thread runs at niceness {nice}, which its threads and workers would lose"
    attr = _SchedAttr(
        size=ctypes.sizeof(_SchedAttr),
        sched_policy=SCHED_OTHER,
        sched_flags=SCHED_FLAG_RESET_ON_FORK,
        # sched_setattr sets the niceness too: keep the one the thread has.
        sched_nice=nice,
        sched_runtime=slice_us * 1000,
    )
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(numbers[0], 0, ctypes.byref(attr), 0) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def slice_ns(tid: int = 0) -> int | None:
    """The slice of thread ``tid`` (0: the calling one) in ns, the kernel's
    default where none was asked for; None when it cannot be read."""
    numbers = _syscalls()
    if numbers is None:
        return None
    attr = _SchedAttr()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(numbers[1], tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        return None
    return int(attr.sched_runtime)


# The lowest real-time priority: above every normal thread, below the
# kernel's own real-time threads and whatever an administrator set higher.
REALTIME_PRIORITY = 1


def request_realtime(on: bool = True) -> str | None:
    """Run the calling thread at real-time priority :data:`REALTIME_PRIORITY`
    (``SCHED_RR``, reset on fork), or under the normal policy again when
    ``on`` is false; None when done, else why not."""
    if not sys.platform.startswith("linux"):
        return f"not supported on {sys.platform}"
    policy = (os.SCHED_RR if on else os.SCHED_OTHER) | os.SCHED_RESET_ON_FORK
    try:
        if on:
            current = os.sched_getscheduler(0) & ~SCHED_RESET_ON_FORK
            nice = os.getpriority(os.PRIO_PROCESS, 0)
            cpus = len(os.sched_getaffinity(0))
    except OSError as err:
        return f"the thread's scheduling cannot be read: {err.strerror}"
    if on:
        if current != SCHED_OTHER:
            return "the thread does not run under the normal policy"
        if nice != 0:
            # Reset on fork starts a real-time thread's children at niceness 0.
            return f"the thread runs at niceness {nice}, which the workers it starts would not keep"
        if cpus < 2:
            # A busy real-time loop would leave the recorders 5 % of the one CPU.
            return "the thread may run on one CPU only, which the recorder workers need too"
    try:
        # Back to normal with reset-on-fork still set: a thread without
        # CAP_SYS_NICE may not clear it.
        os.sched_setscheduler(0, policy, os.sched_param(REALTIME_PRIORITY if on else 0))
    except OSError as err:
        if err.errno == errno.EPERM:
            return (
                "not permitted: the process needs CAP_SYS_NICE or a real-time priority"
                " limit of 1 (LimitRTPRIO=1), and real-time time in its control group"
                " where the kernel divides it (CONFIG_RT_GROUP_SCHED)"
            )
        return f"refused: {err.strerror}"
    return None


class LoopSlice:
    """While the node is busy (:meth:`busy`) the loop's thread runs at
    real-time priority where it may, else with a short slice; at the
    kernel's defaults otherwise. Called on the loop's thread only: a policy
    and a slice are a thread's."""

    __slots__ = ("_held", "_realtime", "_realtime_held", "_refused", "_slice_us")

    def __init__(self, slice_us: int, *, realtime: bool = False) -> None:
        self._slice_us = slice_us
        self._realtime = realtime
        self._held = False
        self._realtime_held = False
        self._refused: set[str] = set()

    def busy(self, busy: bool) -> None:
        """Whether the node is busy now: the priority or the slice is asked
        for or given back on a change."""
        if busy is self._held or not (self._slice_us or self._realtime):
            return
        self._held = busy
        if self._realtime_held:
            if not busy:
                refused = request_realtime(False)
                if refused is None:
                    self._realtime_held = False
                # Else still held: tried again when the node is next idle.
                self._once("real-time priority not given back", refused)
            return
        if busy and self._realtime:
            refused = request_realtime()
            if refused is None:
                self._realtime_held = True
                return
            self._once("real-time priority not set", refused)
        if self._slice_us:
            self._once("scheduler slice not set", request_slice(self._slice_us if busy else 0))

    def _once(self, event: str, refused: str | None) -> None:
        # Once each: signaling works without them, only its latency on a busy node is worse.
        if refused is not None and event not in self._refused:
            self._refused.add(event)
            _log.info(event, slice_us=self._slice_us, reason=refused)
