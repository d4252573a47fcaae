#!/usr/bin/env python3
"""Protocol fuzzing at depth: the consult life cycle for 100,000 frames and more.

Run from the repository root (see docs/benchmarks.md, "Protocol fuzzing"):

    .venv/bin/python bench/protocol_fuzz.py --frames 100000 --max-minutes 20

It runs the test ``test_the_consult_life_cycle_keeps_to_protocol_md`` of
``tests/test_signaling_fuzz.py`` (the state machine of
``tests/support/consult_machine.py``) under pytest, in a process of its own
per backend and run, with ``VIDEOCONSULT_FUZZ_FRAMES`` set: the test then
runs rounds of 50 examples of up to ``--steps`` steps each until the clients
have sent ``--frames`` WebSocket frames, or ``--max-minutes`` (shared by all
runs) are spent; a round starts only before then. Each example is a fresh
server (SQLite, with the in-process broker or the real Redis); every message
of every socket is checked against the model after every step.

Printed and saved: frames sent (of which random or malformed, and the
pings after each step), examples, steps, wall time and failures, per run.
A failure is hypothesis's shrunk example, in the run's ``pytest.log``.
Results go to ``bench/results/<timestamp>-protocol-fuzz/`` (``results.json``,
``summary.md``, one ``pytest-<backend>-<run>.log`` per run). Exit status 1
when a run failed or did not report.

Each run is bounded by the time budget plus 10 minutes for hypothesis to
shrink a failure; a run over that is killed with its process group. The
examples' data directories go under ``/dev/shm`` where there is one (the
fuzz is about the protocol, not the disk), and are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, Invocation, commit, cpu_model, loadavg, memory_gib, number

TEST = "tests/test_signaling_fuzz.py::test_the_consult_life_cycle_keeps_to_protocol_md"
BACKENDS = ("in-process", "redis")
# Hypothesis stops shrinking a failure after five minutes; a run may take that
# much beyond its budget, and the round it was in.
SHRINK_S = 10 * 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--frames", type=int, default=100_000, help="frames per run (100000)")
    parser.add_argument(
        "--max-minutes", type=float, default=20, help="for all runs together; no round starts after"
    )
    parser.add_argument("--runs", type=int, default=1, help="runs per backend (1)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        action="append",
        help="in-process (default) or redis (the real Redis of the tests); may repeat",
    )
    parser.add_argument("--steps", type=int, default=60, help="steps per example at most (60)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    backends = args.backend or ["in-process"]

    results: dict[str, Any] = {
        "commit": commit("signaling", "server", "tests"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "memory_gib": memory_gib(),
            "loadavg_at_start": loadavg(),
        },
        "settings": {"frames": args.frames, "steps": args.steps, "max_minutes": args.max_minutes},
        "runs": [],
    }
    invocation = Invocation(
        results, kind="protocol-fuzz", max_minutes=args.max_minutes, save=not args.no_save
    )
    deadline = time.monotonic() + args.max_minutes * 60
    failed = False
    for run in range(1, args.runs + 1):
        for backend in backends:
            if invocation.over_budget(f"{backend} run {run}"):
                continue
            minutes = max(0.5, (deadline - time.monotonic()) / 60)
            figures = fuzz(invocation.out_dir, backend, run, args.frames, args.steps, minutes)
            results["runs"].append(figures)
            invocation.save()
            failed = failed or figures.get("failures") != 0
            print(line(figures), flush=True)
    invocation.finish(summary_table)
    return 1 if failed or not results["runs"] else 0


def fuzz(out_dir: Path, backend: str, run: int, frames: int, steps: int, minutes: float) -> Any:
    """One pytest process: the deep run of the state machine on ``backend``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = Path(tempfile.mkdtemp(prefix="protocol-fuzz-stats-"))
    shm = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a private directory in it
    scratch = Path(tempfile.mkdtemp(prefix="protocol-fuzz-", dir=shm if shm.is_dir() else None))
    log = out_dir / f"pytest-{backend}-{run}.log"
    environ = {
        **os.environ,
        "VIDEOCONSULT_FUZZ_FRAMES": str(frames),
        "VIDEOCONSULT_FUZZ_MINUTES": f"{minutes:.2f}",
        "VIDEOCONSULT_FUZZ_STEPS": str(steps),
        "VIDEOCONSULT_FUZZ_STATS": str(stats),
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        f"{TEST}[{backend}]",
        "-n",
        "0",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--basetemp={scratch / 'pytest'}",
        # The suite's 300 s per test (pytest-timeout) would cut a deep run
        # short: this one test runs the minutes, plus its last round. A hung
        # step still fails after 120 s (tests/support/consult_machine.py).
        f"--timeout={round(minutes * 60) + 900}",
    ]
    print(f"bench: {backend} run {run}: up to {frames:,} frames in {minutes:.1f} min", flush=True)
    started = time.monotonic()
    try:
        with log.open("w") as output:
            process = subprocess.Popen(  # noqa: S603 - our own test, with our own arguments
                command,
                cwd=ROOT,
                env=environ,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                status = process.wait(timeout=minutes * 60 + SHRINK_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status = None
            except BaseException:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
        report = stats / f"{backend}.json"
        figures: dict[str, Any] = (
            json.loads(report.read_text()) if report.exists() else {"backend": backend}
        )
    finally:
        shutil.rmtree(stats, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    figures.update(
        run=run,
        pytest_status=status,
        process_s=round(time.monotonic() - started, 1),
        log=log.name,
    )
    if status != 0:
        figures["failures"] = max(1, figures.get("failures", 1))
    return figures


def line(figures: dict[str, Any]) -> str:
    if "frames" not in figures:
        where = f"{figures['backend']} run {figures['run']}"
        return f"bench: {where}: no figures (see {figures['log']})"
    return (
        f"bench: {figures['backend']} run {figures['run']}: {figures['frames']:,} frames "
        f"({figures['random_frames']:,} random or malformed, {figures['sync_frames']:,} pings), "
        f"{figures.get('messages', 0):,} server messages checked, "
        f"{figures['examples']:,} examples, {figures['steps']:,} steps, "
        f"{figures['wall_s']:.0f} s, {figures['failures']} failures"
    )


def summary_table(results: dict[str, Any]) -> str:
    rows = [
        "| backend | run | frames | random or malformed | pings after steps "
        "| server messages checked | examples | steps | wall time | failures |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for figures in results["runs"]:
        if "frames" not in figures:
            rows.append(f"| {figures['backend']} | {figures['run']} | no figures ||||||| 1 |")
            continue
        rows.append(
            f"| {figures['backend']} | {figures['run']} | {number(figures['frames'])} "
            f"| {number(figures['random_frames'])} | {number(figures['sync_frames'])} "
            f"| {number(figures.get('messages', 0))} "
            f"| {number(figures['examples'])} | {number(figures['steps'])} "
            f"| {figures['wall_s'] / 60:.1f} min | {figures['failures']} |"
        )
    machine = results["machine"]
    rows.append("")
    rows.append(
        f"Commit {results['commit']}; {machine['cpu']}, {machine['cores']} cores, "
        f"load {machine['loadavg_at_start']} at the start."
    )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
