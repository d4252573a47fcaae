#!/usr/bin/env python3
"""Signaling load benchmark: videoconsult's /ws against the PeerJS server, on loopback.

Run from the repository root (see docs/benchmarks.md):

    .venv/bin/pip install --require-hashes --no-deps -r requirements/bench.txt
    (cd bench && npm ci)
    .venv/bin/python bench/signaling_load.py --pairs 500 2000 --runs 3

For every run the benchmark starts a fresh server on 127.0.0.1 (ours:
``videoconsult serve`` on a new PostgreSQL database and data directory;
PeerJS: ``node bench/peerjs_server.cjs``), opens P pairs of sockets, lets every pair do one
warm-up negotiation, then measures a fixed-duration phase in which each pair
negotiates over and over (closed loop): the first side sends an offer (~3 KB
SDP) and 8 trickle candidates (~250 B each); the other side, on the offer,
sends an answer (~3 KB) and 8 candidates; when all 18 have arrived the pair
starts its next round. Every message carries the sender's monotonic clock in
nanoseconds (ours: an ``a=x-ts:`` SDP line / an ``x-ts`` candidate extension;
PeerJS: ``payload.ts``), so the receiver measures one-way latency; sender and
receiver are both in this process, on the same clock.

``--topology`` runs ours as one node without Redis (``single``, the
default), one node on Redis (``single-redis``), or two nodes on the same
PostgreSQL and Redis with every pair's therapist on one and patient on the
other (``cross``) or both participants of a pair on one node, the pairs
split between the two (``two-nodes``).

Only addresses on 127.0.0.1 are ever contacted. Every loop is bounded by a
count or a deadline, the whole invocation by ``--max-minutes``, and every
server process it starts is killed on the way out, also on errors and Ctrl+C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from _common import (
    HOST,
    ROOT,
    Invocation,
    cancel_on_signals,
    client_session,
    machine,
    raise_fd_limit,
    run_main,
)
from _signaling_background import add_background_arguments, background_runs, clean_run
from _signaling_phase import (
    close_sockets,
    measure_phase,
    profile_paths,
    start_profiler,
    stop_run,
)
from _signaling_processes import (
    PROCESSES,
    REDIS_SERVER,
    find_redis,
    loopback_redis,
    proc_cpu_s,
    proc_peak_rss,
    proc_rss,
    redis_connected_clients,
)
from _signaling_report import analyse_profile, background_table, summary_table
from _signaling_servers import TOPOLOGIES, OursServer, PeerJSServer, Server
from _signaling_storm import storms
from _signaling_wire import Workload

from signaling.scheduling import request_slice

# --------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------


async def measured_run(
    server: Server, args: argparse.Namespace, n_pairs: int, profile_to: Path | None = None
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "server": server.name,
        "topology": server.topology,
        "config": server.label,
        "pairs": n_pairs,
        "shape": args.shape,
    }
    t0 = time.monotonic()
    readers: list[asyncio.Task[None]] = []
    try:
        await server.start()
        async with client_session() as session:
            prepared = await asyncio.wait_for(
                server.prepare(session, n_pairs, args.setup_concurrency), args.setup_timeout
            )
            work = Workload(server.codec, args.candidates, args.shape)
            pairs = await asyncio.wait_for(
                server.open_pairs(
                    session, prepared, n_pairs, args.setup_concurrency, work.reading(readers)
                ),
                args.setup_timeout,
            )
            result["setup_s"] = round(time.monotonic() - t0, 1)
            # Warm-up: one negotiation per pair, not counted.
            await work.drive(
                pairs, duration_s=3600, rounds=1, jitter_s=0.5, round_timeout_s=args.round_timeout
            )
            warm = work.stats
            if warm.received != warm.sent or warm.errors:
                raise RuntimeError(
                    f"{server.name}: warm-up lost {warm.sent - warm.received} of {warm.sent} "
                    f"messages, {warm.errors} errors: {warm.error_samples}"
                )
            await asyncio.sleep(0.5)
            result["server_rss_mb_before"] = round(sum(map(proc_rss, server.pids)) / 2**20, 1)
            # Saturation: every pair negotiates again as soon as its last one completed.
            result.update(
                await measure_phase(server, work, pairs, args, interval_s=0, profile_to=profile_to)
            )
            # All nodes together: the service's memory.
            result["server_rss_mb_after"] = round(sum(map(proc_rss, server.pids)) / 2**20, 1)
            result["server_peak_rss_mb"] = round(sum(map(proc_peak_rss, server.pids)) / 2**20, 1)
            redis_clients = await redis_connected_clients()
            if redis_clients is not None and server.topology != "single":
                result["redis_clients"] = redis_clients
            if args.paced_interval > 0 and profile_to is None:
                # The same offered load for both servers: one negotiation per pair
                # every paced_interval seconds, so latency is compared at equal load.
                await asyncio.sleep(0.5)
                paced = await measure_phase(
                    server, work, pairs, args, interval_s=args.paced_interval
                )
                result.update({f"paced_{k}": v for k, v in paced.items()})
            await close_sockets(pairs, readers)
            server.stop()  # before the client closes 2P sockets one by one
    finally:
        await stop_run(server, readers)
    result["total_s"] = round(time.monotonic() - t0, 1)
    return result


async def idle_run(
    server: Server, args: argparse.Namespace, n_conn: int, profile_to: Path | None = None
) -> dict[str, Any]:
    """Memory per idle connection: server RSS before and after opening n_conn sockets."""
    n_pairs = n_conn // 2
    t0 = time.monotonic()
    readers: list[asyncio.Task[None]] = []
    try:
        await server.start()
        async with client_session() as session:
            prepared = await asyncio.wait_for(
                server.prepare(session, n_pairs, args.setup_concurrency), args.setup_timeout
            )
            await asyncio.sleep(args.settle)
            before = proc_rss(server.pid)
            work = Workload(server.codec, args.candidates)  # readers answer pings, nothing else
            pairs = await asyncio.wait_for(
                server.open_pairs(
                    session, prepared, n_pairs, args.setup_concurrency, work.reading(readers)
                ),
                args.setup_timeout,
            )
            await asyncio.sleep(args.settle)
            after = proc_rss(server.pid)
            # What the open, silent connections cost in CPU (heartbeats, timers, checks).
            cpu_before, wall_before = proc_cpu_s(server.pid), time.monotonic()
            await asyncio.sleep(args.idle_cpu_window)
            idle_cpu_pct = (proc_cpu_s(server.pid) - cpu_before) / (time.monotonic() - wall_before)
            if profile_to is not None:
                # After the CPU reading, so the profiler's own cost is not in it.
                profiler = start_profiler(server.pid, args.idle_cpu_window, profile_to)
                try:
                    await asyncio.to_thread(profiler.wait, 60)
                finally:
                    PROCESSES.stop(profiler)
            open_now = sum(1 for p in pairs for ws in p.sockets if not ws.closed)
            if open_now < n_conn:
                print(f"bench: only {open_now} of {n_conn} sockets still open", flush=True)
            result = {
                "server": server.name,
                "connections": n_conn,
                "open_at_measurement": open_now,
                "rss_mb_before": round(before / 2**20, 1),
                "rss_mb_after": round(after / 2**20, 1),
                "kb_per_connection": round((after - before) / n_conn / 1024, 1),
                "idle_cpu_pct": round(idle_cpu_pct * 100, 1),
                "peak_rss_mb": round(proc_peak_rss(server.pid) / 2**20, 1),
                "setup_s": round(time.monotonic() - t0, 1),
            }
            await close_sockets(pairs, readers)
            server.stop()
    finally:
        await stop_run(server, readers)
    return result


SNAPSHOT: dict[str, Any] = {}


def snapshot(ref: str) -> tuple[Path, str]:
    """Export commit ``ref`` (read-only ``git archive``) into a temp dir, once."""
    if "path" not in SNAPSHOT:
        git = shutil.which("git") or "git"
        commit = subprocess.run(  # noqa: S603
            [git, "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        target = Path(tempfile.mkdtemp(prefix="vc-bench-src-"))
        archive = subprocess.Popen(  # noqa: S603
            [git, "-C", str(ROOT), "archive", "--format=tar", commit], stdout=subprocess.PIPE
        )
        tar = shutil.which("tar") or "tar"
        subprocess.run([tar, "-x", "-C", str(target)], stdin=archive.stdout, check=True)  # noqa: S603
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {commit} failed")
        SNAPSHOT.update(path=target, commit=commit)
    return SNAPSHOT["path"], SNAPSHOT["commit"]


def configurations(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(server, topology) of every measured configuration, in the order of a repetition.

    PeerJS has one topology, a single process: it runs once per repetition,
    when ``single`` is among the topologies.
    """
    return [
        (name, topology)
        for topology in args.topology
        for name in args.servers
        if name == "ours" or topology == "single"
    ]


def make_server(
    name: str, args: argparse.Namespace, log_dir: Path, topology: str = "single"
) -> Server:
    if name == "ours":
        source, revision = None, "working tree"
        if args.ref:
            source, commit = snapshot(args.ref)
            revision = f"commit {commit[:12]} ({args.ref})"
        return OursServer(
            log_dir,
            rate_per_s=args.rate_per_s,
            burst=args.burst,
            source=source,
            revision=revision,
            db=args.db,
            pg=args.pg,
            topology=topology,
            redis_url=args.redis,
            settings=dict(args.set),
        )
    return PeerJSServer(log_dir)


def _setting(text: str) -> tuple[str, str]:
    """``section.name=value`` as the environment variable that sets it."""
    name, equals, value = text.partition("=")
    if not equals or "." not in name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SECTION.NAME=VALUE")
    return "VIDEOCONSULT_" + name.replace(".", "_").upper(), value


async def main_async(args: argparse.Namespace) -> int:
    # Ctrl+C or SIGTERM cancel the whole run; the servers are stopped in main().
    cancel_on_signals()
    if args.generator_slice_us:
        # This thread runs the generator's loop; see --generator-slice-us.
        refused = request_slice(args.generator_slice_us)
        if refused is not None:
            raise SystemExit(f"--generator-slice-us: {refused}")
    if args.generator_rt:
        # This thread only, reset on fork: the servers and senders it starts run normally.
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(1))
    fds = raise_fd_limit(4 * max(args.idle, 2 * max(args.pairs)) + 1000)
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items()},
        "fd_limit": fds,
        # The machine is shared: how busy it was around the runs.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "runs": [],
        "idle": [],
        "skipped": [],
    }
    invocation = Invocation(results, kind="", max_minutes=args.max_minutes)
    over_budget, save, out_dir = invocation.over_budget, invocation.save, invocation.out_dir
    if args.background:
        make = cast("Callable[[], OursServer]", lambda: make_server("ours", args, out_dir))
        await background_runs(args, make, results, invocation)
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        invocation.finish(background_table)
        return 1 if results["skipped"] or not all(map(clean_run, results["runs"])) else 0
    configs = configurations(args)
    if any(TOPOLOGIES[topology].redis for _, topology in configs):
        await find_redis(args.redis)
        results["redis"] = {k: v for k, v in REDIS_SERVER.items() if k != "url"}
    described = (make_server(name, args, out_dir, topology) for name, topology in configs)
    results["servers"] = {server.label: server.describe() for server in described}

    # Alternate the configurations within each repetition so drift of the
    # shared machine hits all alike.
    for n_pairs in [n for n in args.pairs if n]:
        for rep in range(args.runs):
            for name, topology in configs:
                server = make_server(name, args, out_dir, topology)
                what = f"{server.label} pairs={n_pairs} run={rep + 1}"
                if over_budget(what):
                    continue
                print(f"bench: {what} ...", flush=True)
                try:
                    run = await asyncio.wait_for(
                        measured_run(server, args, n_pairs), timeout=args.run_timeout
                    )
                except Exception as err:
                    print(f"bench: {what} failed: {err!r}", flush=True)
                    traceback.print_exc()
                    results["skipped"].append(f"{what}: failed: {err!r}")
                    save()
                    continue
                run["run"] = rep + 1
                results["runs"].append(run)
                save()
                print(
                    "bench:   {msgs_per_s} msg/s, p50 {p50_ms} ms, p99 {p99_ms} ms, lost {lost}, "
                    "errors {errors}, server {server_cpu_us_per_msg} µs/msg "
                    "({server_cpu_pct}% core), client {client_cpu_pct}%, host {host_busy_pct}%, "
                    "peak RSS {server_peak_rss_mb} MB, setup {setup_s} s".format(**run)
                    + (f", nodes {run['node_cpu_pct']}%" if "node_cpu_pct" in run else "")
                    + (f", Redis {run['redis_cpu_pct']}%" if "redis_cpu_pct" in run else ""),
                    flush=True,
                )

    if args.idle:
        for rep in range(args.idle_runs):
            for name in args.servers:
                what = f"{name} idle={args.idle} run={rep + 1}"
                if over_budget(what):
                    continue
                print(f"bench: {what} ...", flush=True)
                raw = None
                if args.profile and name == "ours" and rep == 0:
                    raw = out_dir / f"profile-ours-idle-{args.idle}.txt"
                try:
                    run = await asyncio.wait_for(
                        idle_run(make_server(name, args, out_dir), args, args.idle, raw),
                        timeout=args.run_timeout,
                    )
                    if raw is not None and raw.exists():
                        report = analyse_profile(raw)
                        (out_dir / f"profile-ours-idle-{args.idle}-summary.txt").write_text(report)
                        print(report, flush=True)
                except Exception as err:
                    print(f"bench: {what} failed: {err!r}", flush=True)
                    traceback.print_exc()
                    results["skipped"].append(f"{what}: failed: {err!r}")
                    save()
                    continue
                results["idle"].append(run)
                save()
                print(
                    "bench:   {kb_per_connection} KB per connection "
                    "({rss_mb_before} -> {rss_mb_after} MB, {open_at_measurement} open)".format(
                        **run
                    ),
                    flush=True,
                )

    if args.storm:

        def profile_storm(pid: int) -> Callable[[], None]:
            raw = out_dir / f"profile-ours-storm-{args.storm}.txt"
            profiler = start_profiler(pid, args.storm_spread + 15, raw)

            def report() -> None:
                try:
                    profiler.wait(60)
                finally:
                    PROCESSES.stop(profiler)
                raw.with_name(f"{raw.stem}-summary.txt").write_text(analyse_profile(raw))

            return report

        await storms(
            args,
            lambda name: make_server(name, args, out_dir),
            results,
            over_budget,
            save,
            profile_storm if args.profile else None,
        )

    # One profiled run of ours per topology (every node under py-spy).
    for topology in args.topology if args.profile and "ours" in args.servers else []:
        if over_budget(f"profile {topology}"):
            break
        n_pairs = args.profile_pairs or max(args.pairs)
        tag = "ours" if topology == "single" else f"ours-{topology}"
        raw = out_dir / f"profile-{tag}-{n_pairs}.txt"
        print(f"bench: profiling {tag} at {n_pairs} pairs with py-spy ...", flush=True)
        try:
            server = make_server("ours", args, out_dir, topology)
            run = await asyncio.wait_for(
                measured_run(server, args, n_pairs, profile_to=raw), timeout=args.run_timeout
            )
            run["profiled"] = True
            results.setdefault("profile_runs", []).append(run)
            for path in profile_paths(raw, TOPOLOGIES[topology].nodes):
                if path.exists():
                    report = analyse_profile(path)
                    path.with_name(f"{path.stem}-summary.txt").write_text(report)
                    print(f"bench: {path.name}\n{report}", flush=True)
        except Exception as err:
            print(f"bench: profile {topology} failed: {err!r}", flush=True)
            traceback.print_exc()
            results["skipped"].append(f"profile {topology}: failed: {err!r}")
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    invocation.finish(summary_table)
    lost = sum(r["lost"] for r in results["runs"] + results.get("storms", []))
    return 1 if lost or results["skipped"] else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pairs",
        type=int,
        nargs="+",
        default=[500, 2000],
        help="concurrent consults (pairs of sockets); several values allowed",
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every configuration")
    parser.add_argument(
        "--servers", nargs="+", choices=["ours", "peerjs"], default=["ours", "peerjs"]
    )
    parser.add_argument(
        "--topology",
        nargs="+",
        choices=list(TOPOLOGIES),
        default=["single"],
        help="our nodes: "
        + "; ".join(f"{name}: {t.about}" for name, t in TOPOLOGIES.items())
        + " (PeerJS runs in single only)",
    )
    parser.add_argument(
        "--redis",
        default=f"redis://{HOST}:6379/0",
        help="the Redis server of the topologies on Redis (loopback only); every run uses "
        "a key prefix of its own and deletes its keys afterwards. The URL goes to the nodes "
        "as redis.url",
    )
    parser.add_argument(
        "--duration", type=float, default=12.0, help="seconds of the measured phase of each run"
    )
    parser.add_argument(
        "--paced-interval",
        type=float,
        default=4.0,
        help="second phase: each pair starts one negotiation every this many seconds "
        "(the same offered load on both servers; 0 skips it)",
    )
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=1000,
        help="upper bound of negotiations per pair in the measured phase",
    )
    parser.add_argument("--candidates", type=int, default=8, help="trickle candidates per side")
    parser.add_argument(
        "--shape",
        choices=["burst", "pingpong"],
        default="burst",
        help="burst: each side's SDP and candidates at once; pingpong: one message in "
        "flight per pair, each sent when the last arrived",
    )
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=30.0,
        help="a negotiation not complete after this many seconds is lost",
    )
    parser.add_argument(
        "--idle",
        type=int,
        default=10000,
        help="idle connections for the memory measurement (0: skip)",
    )
    parser.add_argument(
        "--idle-cpu-window",
        type=float,
        default=10.0,
        help="seconds over which the idle server's CPU is read",
    )
    parser.add_argument("--idle-runs", type=int, default=3)
    parser.add_argument(
        "--storm", type=int, default=0, help="admission storm: patients arriving (0: skip)"
    )
    parser.add_argument("--storm-spread", type=float, default=2.0, help="their arrival, seconds")
    parser.add_argument(
        "--storm-at-once",
        type=int,
        default=0,
        help="at most this many patients on their way in at a time (0: no limit)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds to let the server settle before reading its RSS",
    )
    parser.add_argument("--setup-concurrency", type=int, default=32)
    parser.add_argument("--setup-timeout", type=float, default=300.0)
    parser.add_argument("--run-timeout", type=float, default=480.0)
    parser.add_argument(
        "--rate-per-s",
        type=float,
        default=10000.0,
        help="our signaling.rate_per_s for the run (default 20 would throttle)",
    )
    parser.add_argument("--burst", type=int, default=100000, help="our signaling.burst")
    parser.add_argument(
        "--db",
        choices=["postgres", "sqlite"],
        default="postgres",
        help="our database: a fresh PostgreSQL database per run (as deployed), "
        "or the SQLite default in the temp data dir",
    )
    parser.add_argument(
        "--pg",
        default=f"postgres@{HOST}:5432",
        help="user@host:port of the PostgreSQL server (loopback only)",
    )
    parser.add_argument(
        "--generator-slice-us",
        type=int,
        default=0,
        metavar="US",
        help="the load generator's loop asks Linux for this time slice, as the server's does"
        " (recording.loop_slice_us): it stands for browsers on other machines, whose"
        " wake-ups do not wait for this node's busy cores (default 0: the kernel's)",
    )
    parser.add_argument(
        "--generator-rt",
        action="store_true",
        help="the load generator's loop runs at real-time priority 1 (SCHED_RR; needs root"
        " or CAP_SYS_NICE): it stands for browsers on other machines, whose wake-ups do"
        " not wait for this node's recorders (docs/benchmarks.md, 'The loop at real-time"
        " priority')",
    )
    parser.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="SECTION.NAME=VALUE",
        help="a setting of our server's, e.g. recording.loop_slice_us=0 (repeatable)",
    )
    parser.add_argument(
        "--ref",
        default="",
        help="benchmark this commit of ours (exported with git archive to a temp "
        "dir) instead of the working tree, e.g. HEAD",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one extra run of ours under py-spy (not counted in the table)",
    )
    parser.add_argument("--profile-pairs", type=int, default=0)
    parser.add_argument(
        "--max-minutes", type=float, default=19.0, help="no new run starts after this many minutes"
    )
    add_background_arguments(parser)
    args = parser.parse_args(argv)
    if args.background and (args.db != "postgres" or args.topology != ["single"]):
        parser.error("--background runs ours on one node with PostgreSQL")
    try:
        loopback_redis(args.redis)
    except ValueError as err:
        parser.error(str(err))
    if args.db != "postgres" and any(TOPOLOGIES[t].nodes > 1 for t in args.topology):
        parser.error("two nodes share one database: --topology cross/two-nodes need --db postgres")
    return args


def cleanup() -> None:
    """Stop every server this run started and remove the snapshot of --ref."""
    PROCESSES.stop_all()
    if "path" in SNAPSHOT:
        shutil.rmtree(SNAPSHOT["path"], ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(main_async(args), cleanup)


if __name__ == "__main__":
    sys.exit(main())
