#!/usr/bin/env python3
"""Access-log benchmark: appends per second, and the time to verify a chain of a million records.

Run from the repository root (see docs/benchmarks.md, "Access log"):

    .venv/bin/python bench/access_chain.py --runs 3

Targets: SQLite (a fresh file in a new temp directory; by default once on the
system temp dir, a disk, and once on tmpfs ``/dev/shm`` where there is one)
and PostgreSQL (a fresh database on 127.0.0.1:5432, user postgres, created
on the maintenance database and dropped again afterwards, also after an
error or Ctrl+C). The schema comes from ``audit.migrate.upgrade``; the engine
from ``audit.db.create_engine``, exactly as the server makes it (its pool,
and on SQLite every transaction ``BEGIN IMMEDIATE``).

The log is one hash chain per organisation (plus the installation's);
appends to one chain serialize (PostgreSQL: an advisory lock per chain;
SQLite: its single writer, whatever the chain). Per run and target, on a
fresh database:

- *sequential appends*: N records, one after another, each
  ``append_access`` in its own transaction (``engine.begin()``), as the
  server writes them, spread over ``--orgs`` organisations;
- *concurrent appends*: C tasks append N records in all, each record in its
  own transaction, spread over ``--orgs`` organisations;
- *concurrent appends, one chain*: the same, all of one organisation, so
  every append waits for the one before it;
- the same two concurrent phases through the group-commit writer
  (``audit.access_writer.AccessLogWriter``): the records queued while a
  batch commits are chained in the next transaction;
- the log is verified afterwards: it must be intact and hold 5 N records.

Then, per target, one fresh database is filled with ``--verify-records``
records (by default all of one organisation: one chain of a million)
computed here with ``canonical_fields`` and ``record_hash`` and
bulk-inserted (SQLite: executemany in batches; PostgreSQL: COPY, then VACUUM
ANALYZE), and ``verify_chain(engine)`` (worker processes) is timed end to end on it,
with the event loop's longest hold meanwhile (``server.loop_lag``), once per run with
its default batch (10,000) and once with ``--big-batch``, reading the
process's peak RSS (VmHWM, reset before each verify) alongside. A last,
short probe starts one more verify and, a second into it, one append, to
see whether a verify holds up writers.

Every loop is bounded by a count and a deadline; the whole invocation by
``--max-minutes``. Results go to ``bench/results/<timestamp>-access-chain/``
(``results.json``, ``summary.md``). Exit status 1 when a chain is broken,
an append failed, or a phase could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy as sa
from _access_chain_report import machine, postgres_settings, summary_table
from _access_chain_setup import (
    COLUMNS,
    CREATED_DBS,
    CREATED_DIRS,
    Database,
    Meter,
    Target,
    bench_record,
    chain_batches,
    drop_pg_database,
    fresh_database,
    remove_dir,
    reset_peak_rss,
)
from _common import (
    Invocation,
    cancel_on_signals,
    loadavg,
    proc_status_kb,
    run_main,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.access_log import (
    ChainReport,
    append_access,
    verify_chain,
)
from audit.access_writer import AccessLogWriter
from audit.schema import access_log
from server.loop_lag import LoopLag

SHM_DIR = "/dev/shm"  # noqa: S108 - a new directory is made inside, and removed
PY_SPY = Path(sys.executable).parent / "py-spy"


# --------------------------------------------------------------------------
# The measurements.
# --------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed_append(
    engine: AsyncEngine,
    n: int,
    orgs: int,
    latencies: list[float],
    writer: AccessLogWriter | None = None,
) -> None:
    """One append: through the group-commit writer, or in a transaction of its own."""
    t0 = time.perf_counter()
    record = bench_record(n, orgs, at=dt.datetime.now(dt.UTC))
    if writer is not None:
        await writer.append(record)
    else:
        async with engine.begin() as conn:
            await append_access(conn, record)
    latencies.append(time.perf_counter() - t0)


async def append_phase(
    engine: AsyncEngine,
    *,
    count: int,
    tasks: int,
    orgs: int,
    deadline_s: float,
    first: int,
    prefix: str,
    grouped: bool = False,
) -> dict[str, Any]:
    """``count`` appends from ``tasks`` tasks (1: one after another), each its own
    transaction, or (``grouped``) through one group-commit writer."""
    writer = AccessLogWriter(engine) if grouped else None
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    stop = time.monotonic() + deadline_s
    shares = [count // tasks + (1 if t < count % tasks else 0) for t in range(tasks)]

    async def worker(t: int) -> None:
        base = first + sum(shares[:t])
        for i in range(shares[t]):
            if time.monotonic() > stop:
                return
            try:
                await timed_append(engine, base + i, orgs, latencies, writer)
            except Exception as err:
                errors[type(err).__name__ + ": " + str(err).splitlines()[0][:120]] += 1

    with Meter() as meter:
        await asyncio.gather(*(worker(t) for t in range(tasks)))
    done = len(latencies)
    if writer is not None:
        await writer.close()
    return {
        f"{prefix}_tasks": tasks,
        f"{prefix}_orgs": orgs,
        f"{prefix}_appends": done,
        f"{prefix}_appends_per_s": round(done / meter.wall, 1),
        f"{prefix}_p50_ms": round(1000 * pct(latencies, 0.5), 3),
        f"{prefix}_p99_ms": round(1000 * pct(latencies, 0.99), 3),
        f"{prefix}_errors": dict(errors),
        f"{prefix}_failed": sum(errors.values()),
        **meter.figures(prefix),
    }


def pool_description(engine: AsyncEngine) -> str:
    pool = engine.pool
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", None)
    if callable(size):
        return f"{type(pool).__name__}(size={size()}, max_overflow={overflow})"
    return type(pool).__name__


# The append phases: (key prefix, tasks, organisations, label, group commit)
# given the arguments. The first three append one record per transaction, as
# the server did before group commit (and still does for a change's record).
PHASES = ("seq", "conc", "one", "gc", "gcone")


def phases(args: argparse.Namespace) -> list[tuple[str, int, int, str, bool]]:
    c = args.concurrency
    every = [
        ("seq", 1, args.orgs, "sequential appends", False),
        ("conc", c, args.orgs, f"appends from {c} tasks", False),
        ("one", c, 1, f"appends from {c} tasks, one chain", False),
        ("gc", c, args.orgs, f"group-commit appends from {c} tasks", True),
        ("gcone", c, 1, f"group-commit appends from {c} tasks, one chain", True),
    ]
    return [phase for phase in every if phase[0] in args.phases]


async def append_run(target: Target, args: argparse.Namespace, rep: int) -> dict[str, Any]:
    async with fresh_database(target, args) as db:
        engine = db.engine
        run: dict[str, Any] = {"target": target.name, "run": rep, "pool": pool_description(engine)}
        expected = 0
        for number_, (prefix, tasks, orgs, label, grouped) in enumerate(phases(args)):
            print(f"bench: {target.name} run {rep}: {args.appends} {label} ...", flush=True)
            figures = await append_phase(
                engine,
                count=args.appends,
                tasks=tasks,
                orgs=orgs,
                deadline_s=args.phase_seconds,
                first=1 + number_ * 1_000_000,
                prefix=prefix,
                grouped=grouped,
            )
            run.update(figures)
            expected += figures[f"{prefix}_appends"]
            print(
                f"bench:   {figures[f'{prefix}_appends_per_s']:,.0f}/s "
                f"(p50 {figures[f'{prefix}_p50_ms']} ms, p99 {figures[f'{prefix}_p99_ms']} ms), "
                f"errors {sum(figures[f'{prefix}_errors'].values())}, "
                f"host busy {figures[f'{prefix}_host_busy_pct']} %",
                flush=True,
            )
        report = await verify_chain(engine)
        run["chain_records"] = report.records
        run["chains"] = report.chains
        run["chain_intact"] = report.intact and report.records == expected
        if report.broken is not None:
            broken = report.broken
            run["chain_break"] = f"{broken.chain} {broken.seq} {broken.kind.value}"
        print(
            f"bench:   log: {report.records} records in {report.chains} chains "
            f"(expected {expected}), {'intact' if report.intact else 'BROKEN'}",
            flush=True,
        )
        return run


async def fill_chain(db: Database, total: int, batch: int, orgs: int) -> None:
    """Write a valid chain of ``total`` records without append_access, fast."""
    done = 0
    last_print = time.monotonic()
    if db.target.backend == "postgres":
        conn = await asyncpg.connect(pg_dsn_for(db), timeout=10)
        try:
            for rows in chain_batches(total, batch, orgs):
                await conn.copy_records_to_table("access_log", records=rows, columns=COLUMNS)
                done += len(rows)
                if time.monotonic() - last_print > 10:
                    print(f"bench:   filled {done:,} ...", flush=True)
                    last_print = time.monotonic()
            # As autovacuum would have by the time anyone verifies: statistics,
            # the visibility map and hint bits.
            await conn.execute("VACUUM ANALYZE access_log")
        finally:
            await conn.close()
        return
    insert = access_log.insert()
    for rows in chain_batches(total, batch, orgs):
        async with db.engine.begin() as conn:
            await conn.execute(insert, [dict(zip(COLUMNS, row, strict=True)) for row in rows])
        done += len(rows)
        if time.monotonic() - last_print > 10:
            print(f"bench:   filled {done:,} ...", flush=True)
            last_print = time.monotonic()
    async with db.engine.begin() as conn:
        await conn.execute(sa.text("ANALYZE"))


def file_mb(path: str) -> int:
    return round(Path(path).stat().st_size / 2**20)


def pg_dsn_for(db: Database) -> str:
    url = db.engine.url
    return f"postgresql://{url.username}@{url.host}:{url.port}/{db.location}"


async def timed_verify(
    db: Database, batch: int, timeout_s: float, profile_to: Path | None = None
) -> tuple[ChainReport, dict[str, Any]]:
    """Verify from the engine (a worker process walks the chains), watching the loop's lag."""
    spy: subprocess.Popen[bytes] | None = None
    rss_before = proc_status_kb("VmRSS")
    peak_reset = reset_peak_rss()
    if profile_to is not None:
        spy = start_py_spy(profile_to)
    watcher = LoopLag(warn_after_s=60.0, probe_s=0.005)
    watcher.start()
    try:
        with Meter() as meter:
            report = await asyncio.wait_for(verify_chain(db.engine, batch=batch), timeout_s)
    finally:
        watcher.stop()
        if spy is not None:
            stop_py_spy(spy)
    figures = {
        "batch": batch,
        "records": report.records,
        "chains": report.chains,
        "intact": report.intact,
        "records_per_s": round(report.records / meter.wall),
        "rss_before_mb": round(rss_before / 1024, 1),
        "peak_rss_mb": round(proc_status_kb("VmHWM") / 1024, 1) if peak_reset else None,
        "loop_lag_max_ms": round(1000 * watcher.window()[0], 1),
        **meter.figures("verify"),
    }
    return report, figures


def start_py_spy(output: Path) -> subprocess.Popen[bytes]:
    spy = subprocess.Popen(  # noqa: S603 - our own venv's py-spy, on our own pid
        [
            str(PY_SPY),
            "record",
            "--pid",
            str(os.getpid()),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(output),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # let it attach
    return spy


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(timeout=10)


def profile_summary(raw: Path, top: int = 20) -> str:
    """Self and inclusive shares of the functions in a py-spy raw (collapsed) profile."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [strip_line(f) for f in stack.split(";")]
        # py-spy's first frame is the thread ("process 1:"... or "thread (0x...)").
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples", "", "self:"]
    lines += [f"  {100 * c / total:5.1f} %  {f}" for f, c in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {100 * c / total:5.1f} %  {f}" for f, c in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def strip_line(frame: str) -> str:
    """``name (path/file.py:123)`` -> ``name (file.py)``."""
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(path).name})"


async def writer_probe(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    """Start a verify; a second into it, append one record; say how that went."""
    started = asyncio.Event()

    async def verifying() -> None:
        started.set()
        await verify_chain(db.engine)

    task = asyncio.create_task(verifying())
    try:
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.sleep(1.0)
        latencies: list[float] = []
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(timed_append(db.engine, 5_000_000, args.orgs, latencies), 60)
            outcome = "appended"
        except Exception as err:
            outcome = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        waited = time.perf_counter() - t0
        return {
            "verify_still_running": not task.done(),
            "append_outcome": outcome,
            "append_wait_s": round(waited, 3),
        }
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def verify_target(
    target: Target, args: argparse.Namespace, out_dir: Path, results: dict[str, Any]
) -> None:
    """Fill one database with the big chain; verify it once per run and batch size."""
    async with fresh_database(target, args) as db:
        print(
            f"bench: {target.name}: filling {args.verify_records:,} records "
            f"({args.verify_orgs} organisations) ...",
            flush=True,
        )
        with Meter() as meter:
            await asyncio.wait_for(
                fill_chain(db, args.verify_records, args.fill_batch, args.verify_orgs),
                args.verify_timeout,
            )
        fill = {"target": target.name, "records": args.verify_records, **meter.figures("fill")}
        if target.backend == "sqlite":
            fill["file_mb"] = file_mb(db.location)
        results["fills"].append(fill)
        print(f"bench:   filled in {meter.wall:.1f} s", flush=True)
        if args.profile:
            raw = out_dir / f"profile-verify-{target.name}.txt"
            print(f"bench: {target.name}: one verify under py-spy ...", flush=True)
            _, figures = await timed_verify(db, 10_000, args.verify_timeout, profile_to=raw)
            results["profiled"].append({"target": target.name, **figures})
            if raw.exists():
                summary = profile_summary(raw)
                (out_dir / f"profile-verify-{target.name}-summary.txt").write_text(summary)
                print(summary, flush=True)
        for rep in range(1, args.runs + 1):
            # The bigger batch once: it reads the same rows, only fewer queries.
            for batch in [10_000, *([args.big_batch] if args.big_batch and rep == 1 else [])]:
                print(f"bench: {target.name} run {rep}: verify, batch {batch:,} ...", flush=True)
                report, figures = await timed_verify(db, batch, args.verify_timeout)
                figures.update(target=target.name, run=rep)
                figures["ok"] = report.intact and report.records == args.verify_records
                results["verifies"].append(figures)
                print(
                    f"bench:   {figures['records']:,} records, "
                    f"{'intact' if report.intact else 'BROKEN'}, {figures['verify_s']} s, "
                    f"{figures['records_per_s']:,}/s, peak RSS {figures['peak_rss_mb']} MB, "
                    f"loop held at most {figures['loop_lag_max_ms']} ms, "
                    f"host busy {figures['verify_host_busy_pct']} %",
                    flush=True,
                )
        if args.probe:
            print(f"bench: {target.name}: one append during a verify ...", flush=True)
            probe = {"target": target.name, **await writer_probe(db, args)}
            results["probes"].append(probe)
            print(f"bench:   {probe}", flush=True)


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------


def make_targets(args: argparse.Namespace) -> list[Target]:
    targets = []
    if "sqlite" in args.db:
        dirs = [tempfile.gettempdir()]
        if not args.no_shm and Path(SHM_DIR).is_dir():
            dirs.append(SHM_DIR)
        for d in dirs:
            name = "sqlite" if d == dirs[0] else "sqlite-shm"
            targets.append(Target(name, "sqlite", d))
    if "postgres" in args.db:
        targets.append(Target("postgres", "postgres"))
    return targets


async def main_async(args: argparse.Namespace) -> int:
    cancel_on_signals()
    targets = make_targets(args)
    results: dict[str, Any] = {
        "machine": machine(args, targets),
        "settings": dict(vars(args)),
        "targets": [{"name": t.name, "describe": t.describe()} for t in targets],
        "runs": [],
        "fills": [],
        "verifies": [],
        "profiled": [],
        "probes": [],
        "failures": [],
        "skipped": [],
    }
    invocation = Invocation(results, kind="access-chain", max_minutes=args.max_minutes)
    over_budget, save = invocation.over_budget, invocation.save
    if any(t.backend == "postgres" for t in targets):
        results["machine"]["postgres"] = await postgres_settings(args)
    print(f"bench: {json.dumps(results['machine'])}", flush=True)

    # Appends: the targets alternate within each repetition, so drift of the
    # shared machine hits all alike.
    for rep in range(1, args.runs + 1):
        for target in targets:
            what = f"appends {target.name} run {rep}"
            if over_budget(what):
                continue
            try:
                run = await asyncio.wait_for(
                    append_run(target, args, rep), 2 * args.phase_seconds + args.verify_timeout
                )
            except Exception as err:
                traceback.print_exc()
                results["failures"].append(f"{what}: {err!r}")
                save()
                continue
            results["runs"].append(run)
            if not run["chain_intact"]:
                results["failures"].append(f"{what}: chain not intact")
            errors = {p: run[f"{p}_errors"] for p, *_ in phases(args) if run.get(f"{p}_errors")}
            if errors:
                results["failures"].append(f"{what}: append errors {errors}")
            save()

    # The big chain: SQLite once (its first directory, a disk), PostgreSQL once.
    if args.verify_records:
        verify_on = [t for t in targets if t.name in ("sqlite", "postgres")]
        if args.verify_all:
            verify_on = targets
        for target in verify_on:
            what = f"verify {target.name}"
            if over_budget(what):
                continue
            try:
                await verify_target(target, args, invocation.out_dir, results)
            except Exception as err:
                traceback.print_exc()
                results["failures"].append(f"{what}: {err!r}")
            save()
        for v in results["verifies"]:
            if not v["ok"]:
                results["failures"].append(
                    f"verify {v['target']} run {v['run']} batch {v['batch']}: "
                    f"{v['records']} records, intact={v['intact']}"
                )

    results["machine"]["loadavg_at_end"] = loadavg()
    invocation.finish(summary_table)
    return 1 if results["failures"] or results["skipped"] else 0


def cleanup(args: argparse.Namespace) -> None:
    """Remove whatever a run interrupted at the wrong moment left behind."""
    for path in list(CREATED_DIRS):
        remove_dir(path)
    if CREATED_DBS:

        async def drop_all() -> None:
            for name in list(CREATED_DBS):
                await drop_pg_database(args, name)

        try:
            asyncio.run(drop_all())
        except Exception as err:
            print(f"bench: could not drop {sorted(CREATED_DBS)}: {err!r}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--db", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every measurement")
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=PHASES,
        default=list(PHASES),
        help="the append phases to run: seq (one after another), conc and one (32 tasks, one "
        "transaction each, 20 organisations or one), gc and gcone (the same through the "
        "group-commit writer)",
    )
    parser.add_argument(
        "--appends", type=int, default=5000, help="appends per phase (sequential; concurrent)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="tasks appending at once in the second phase"
    )
    parser.add_argument(
        "--orgs",
        type=int,
        default=20,
        help="organisations the records are spread over (a chain each, plus the installation's "
        "for every 97th record); the third phase puts all in one",
    )
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=60.0,
        help="an append phase stops after this many seconds even if not all N are done",
    )
    parser.add_argument("--verify-records", type=int, default=1_000_000)
    parser.add_argument(
        "--big-batch",
        type=int,
        default=50_000,
        help="verify once more per run with this batch size (0: only the default 10,000)",
    )
    parser.add_argument(
        "--verify-orgs",
        type=int,
        default=1,
        help="organisations of the big log (1: one chain of --verify-records records)",
    )
    parser.add_argument("--fill-batch", type=int, default=20_000)
    parser.add_argument(
        "--verify-all",
        action="store_true",
        help="also verify the big chain on SQLite in /dev/shm (default: the disk only)",
    )
    parser.add_argument("--verify-timeout", type=float, default=300.0)
    parser.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="skip the append attempted during a verify",
    )
    parser.add_argument(
        "--profile", action="store_true", help="one extra verify per target under py-spy"
    )
    parser.add_argument("--no-shm", action="store_true", help="no SQLite run on /dev/shm")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="database.connect_timeout_s (SQLite: its busy timeout); 5 is the default",
    )
    parser.add_argument("--pg-user", default="postgres")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument(
        "--pg-admin-db", default="postgres", help="where CREATE/DROP DATABASE are run"
    )
    parser.add_argument(
        "--max-minutes", type=float, default=14.0, help="no new phase starts after this"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(main_async(args), lambda: cleanup(args))


if __name__ == "__main__":
    sys.exit(main())
