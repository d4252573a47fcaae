"""How late a sleeping thread wakes while other processes keep every core
busy: with the kernel's default time slice, and with the short one the
server's event loop asks for while recordings run (recording.loop_slice_us,
signaling/scheduling.py).

A probe process sleeps 2 ms, does a little work (about what a relayed
message costs) and sleeps again, for --seconds; its lateness is how much
longer than 2 ms each sleep took. --hogs processes spin meanwhile at
niceness 0 (the default slice), as recorder workers, bulk jobs or the
database's processes would in bursts. The two probes alternate within each
run, so that the machine's drift hits both.

    .venv/bin/python bench/wakeup.py --hogs 3 --runs 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from typing import cast

from signaling.scheduling import request_slice, slice_ns

SLEEP_S = 0.002


def _spin(until: float) -> None:
    while time.monotonic() < until:
        pass


def _probe(slice_us: int, seconds: float, out: multiprocessing.SimpleQueue[object]) -> None:
    if slice_us:
        refused = request_slice(slice_us)
        if refused is not None:
            out.put(f"slice refused: {refused}")
            return
    late: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        time.sleep(SLEEP_S)
        late.append(time.monotonic() - started - SLEEP_S)
        _spin(time.monotonic() + 20e-6)
    out.put((slice_ns(), late))


def measure(slice_us: int, hogs: int, seconds: float) -> tuple[int | None, list[float]]:
    context = multiprocessing.get_context("spawn")
    until = time.monotonic() + seconds + 3
    spinners = [context.Process(target=_spin, args=(until,)) for _ in range(hogs)]
    for spinner in spinners:
        spinner.start()
    try:
        time.sleep(0.5)  # the hogs running
        out: multiprocessing.SimpleQueue[object] = context.SimpleQueue()
        probe = context.Process(target=_probe, args=(slice_us, seconds, out))
        probe.start()
        result = out.get()
        probe.join()
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()
    if isinstance(result, str):
        raise SystemExit(result)
    granted, late = cast("tuple[int | None, list[float]]", result)
    return granted, sorted(late)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hogs", type=int, default=3, help="spinning processes (default 3)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per probe (default 8)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slice-us", type=int, default=100, help="the short slice (default 100)")
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float, float]]] = {"default": [], "short": []}
    for run in range(1, args.runs + 1):
        for name, slice_us in (("default", 0), ("short", args.slice_us)):
            granted, late = measure(slice_us, args.hogs, args.seconds)
            p50 = late[len(late) // 2] * 1e3
            p99 = late[int(len(late) * 0.99)] * 1e3
            rows[name].append((p50, p99, late[-1] * 1e3))
            print(
                f"run {run}, {name} slice ({granted} ns): {len(late)} wake-ups, "
                f"late p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {late[-1] * 1e3:.3f} ms",
                flush=True,
            )
    title = f"wake-up lateness, {args.hogs} hogs, median of {args.runs}"
    print(f"\n| {title} | p50 (ms) | p99 (ms) | max (ms) |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        medians = [statistics.median(v[i] for v in values) for i in range(3)]
        print(f"| {name} slice | " + " | ".join(f"{m:.3f}" for m in medians) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
