"""One measured phase of the signaling benchmark on open, warmed-up pairs, and
the profiler that may watch it (shared by bench/signaling_load.py and its
background runs, bench/_signaling_background.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from _common import collector_paused, cpu_jiffies
from _signaling_processes import PROCESSES, proc_cpu_s, redis_cpu_s
from _signaling_servers import VIDEOCONSULT, Server
from _signaling_wire import Pair, Workload

# --------------------------------------------------------------------------
# Phases.
# --------------------------------------------------------------------------


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[k])


async def stop_run(server: Server, readers: list[asyncio.Task[None]]) -> None:
    """After a run, however it ended: its readers cancelled, its server stopped and cleaned up."""
    for task in readers:
        task.cancel()
    await server.cleanup()


async def close_sockets(pairs: list[Pair], readers: list[asyncio.Task[None]]) -> None:
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


def start_profiler(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on the server for ``seconds``: collapsed stacks, by function."""
    spy = shutil.which("py-spy") or str(VIDEOCONSULT.parent / "py-spy")
    argv = [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds)))]
    # --native: time in C (uvloop, system calls, pydantic-core) is shown as such.
    argv += ["--rate", "250", "--native", "--function", "--format", "raw", "-o", str(out)]
    return PROCESSES.start(argv, env=dict(os.environ), log=out.with_suffix(".log"))


async def measure_phase(
    server: Server,
    work: Workload,
    pairs: list[Pair],
    args: argparse.Namespace,
    *,
    interval_s: float,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """One measured phase on open, warmed-up pairs: closed loop (interval 0) or paced."""
    work.reset()
    pids = server.pids
    with collector_paused():
        cpu_before = [proc_cpu_s(pid) for pid in pids]
        client_before = proc_cpu_s(os.getpid())
        redis_before = redis_cpu_s()
        host_before = cpu_jiffies()
        profilers = []
        if profile_to is not None:
            for pid, out in zip(pids, profile_paths(profile_to, len(pids)), strict=True):
                profilers.append(start_profiler(pid, args.duration, out))
        elapsed = await work.drive(
            pairs,
            duration_s=args.duration,
            rounds=args.max_rounds,
            jitter_s=interval_s or 0.2,
            interval_s=interval_s,
            round_timeout_s=args.round_timeout,
        )
        host_after = cpu_jiffies()
        cpu_after = [proc_cpu_s(pid) for pid in pids]
        client_after = proc_cpu_s(os.getpid())
        redis_after = redis_cpu_s()
    for profiler in profilers:
        try:
            await asyncio.to_thread(profiler.wait, 60)
        finally:
            PROCESSES.stop(profiler)
    stats = work.stats
    lat = sorted(stats.latencies_ns)
    node_cpu = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
    server_cpu = sum(node_cpu)
    busy = (host_after[0] - host_before[0]) / max(1, host_after[1] - host_before[1])
    extra: dict[str, Any] = {}
    if len(pids) > 1:
        # Per node; server_cpu_* above are the sum over the nodes.
        extra["node_cpu_pct"] = [round(cpu / elapsed * 100, 1) for cpu in node_cpu]
        extra["busiest_node_cpu_pct"] = max(extra["node_cpu_pct"])
    if redis_before is not None and redis_after is not None:
        # The whole Redis server: it is shared, other sessions' use is in it too.
        extra["redis_cpu_pct"] = round((redis_after - redis_before) / elapsed * 100, 1)
    return extra | {
        "elapsed_s": round(elapsed, 2),
        "sent": stats.sent,
        "relayed": stats.received,
        # Messages of a timed-out round still on their way by now count as lost.
        "lost": stats.sent - stats.received,
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "round_timeouts": stats.round_timeouts,
        "msgs_per_s": round(stats.received / elapsed, 1),
        "avg_frame_bytes": round(stats.sent_bytes / max(1, stats.sent)),
        "p50_ms": round(percentile(lat, 0.50) / 1e6, 3),
        "p99_ms": round(percentile(lat, 0.99) / 1e6, 3),
        "max_ms": round((lat[-1] if lat else 0) / 1e6, 3),
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_us_per_msg": round(server_cpu / max(1, stats.received) * 1e6, 2),
        "server_cpu_pct": round(server_cpu / elapsed * 100, 1),
        "client_cpu_pct": round((client_after - client_before) / elapsed * 100, 1),
        "host_busy_pct": round(busy * 100, 1),
        "negotiations_per_s": round(stats.received / elapsed / (2 * work.per_side), 1),
    }


def profile_paths(base: Path, n_nodes: int) -> list[Path]:
    """Where py-spy writes each node's stacks: ``base``, or one file per node."""
    if n_nodes == 1:
        return [base]
    return [base.with_name(f"{base.stem}-node-{'ab'[k]}{base.suffix}") for k in range(n_nodes)]
