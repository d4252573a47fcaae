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
- the log is verified afterwards: it must be intact and hold 3 N records.

Then, per target, one fresh database is filled with ``--verify-records``
records (by default all of one organisation: one chain of a million)
computed here with ``canonical_fields`` and ``record_hash`` and
bulk-inserted (SQLite: executemany in batches; PostgreSQL: COPY, then VACUUM
ANALYZE), and ``verify_chain`` is timed end to end on it, once per run with
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
import platform
import resource
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy as sa
from _common import (
    HOST,
    LOOP,
    Invocation,
    cancel_on_signals,
    cell,
    commit,
    cpu_jiffies,
    cpu_model,
    loadavg,
    memory_gib,
    pg_execute,
    proc_status_kb,
    run_main,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.access_log import (
    GENESIS_HASH,
    OPERATOR,
    AccessRecord,
    ChainReport,
    ClientType,
    Outcome,
    append_access,
    canonical_fields,
    chain_of,
    record_hash,
    verify_chain,
)
from audit.db import create_engine
from audit.migrate import upgrade
from audit.schema import access_log

SHM_DIR = "/dev/shm"  # noqa: S108 - a new directory is made inside, and removed
SQLITE_FILE = "videoconsult.db"
PY_SPY = Path(sys.executable).parent / "py-spy"

# The columns a record is written with (``id`` is the database's own).
COLUMNS = (
    "at",
    "organisation_id",
    "actor_id",
    "actor_role",
    "action",
    "object_type",
    "object_id",
    "outcome",
    "client_type",
    "chain",
    "seq",
    "prev_hash",
    "hash",
)

# --------------------------------------------------------------------------
# Records: a plausible mix of organisations, actors, actions and outcomes.
# --------------------------------------------------------------------------

T0 = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)
# Organisation ids: record n belongs to organisation n % orgs, except every
# 97th, which is the operator's (no organisation: the installation's chain).
ORG_BASE = 0x0B0000
ACTORS = [uuid.UUID(int=0x0A0000 + i) for i in range(400)]
ACTIONS = [
    ("consult.read", "consult"),
    ("consult.start", "consult"),
    ("account.read", "account"),
    ("invite.create", "invite"),
    ("account.disable", "account"),
]
CLIENTS = [ClientType.API, ClientType.API, ClientType.WEBSOCKET, ClientType.CLI]


def bench_record(n: int, orgs: int, at: dt.datetime | None = None) -> AccessRecord:
    """Record ``n``: of one of ``orgs`` organisations (1: all in one chain)."""
    action, object_type = ACTIONS[n % len(ACTIONS)]
    by_operator = orgs > 1 and n % 97 == 0
    return AccessRecord(
        # Distinct times with microseconds, as real ones have.
        at=at or T0 + dt.timedelta(microseconds=n * 1_000 + n % 997),
        organisation_id=None if by_operator else uuid.UUID(int=ORG_BASE + n % orgs),
        actor_id=None if by_operator else ACTORS[n % len(ACTORS)],
        actor_role=OPERATOR if by_operator else ("therapist" if n % 5 else "admin"),
        action=action,
        object_type=object_type,
        object_id=str(uuid.UUID(int=(0x0C << 64) + n)),
        outcome=Outcome.REFUSED if n % 23 == 0 else Outcome.ALLOWED,
        client_type=ClientType.CLI if by_operator else CLIENTS[n % len(CLIENTS)],
    )


def chain_batches(total: int, batch: int, orgs: int) -> Iterator[list[tuple[Any, ...]]]:
    """The rows (in COLUMNS order) of ``total`` records in their chains, ``batch`` at a time."""
    heads: dict[str, tuple[int, str]] = {}
    for start in range(1, total + 1, batch):
        rows = []
        for n in range(start, min(start + batch, total + 1)):
            r = bench_record(n, orgs)
            chain = chain_of(r.organisation_id)
            seq, prev = heads.get(chain, (0, GENESIS_HASH))
            seq += 1
            fields = canonical_fields(
                at=r.at,
                organisation_id=r.organisation_id,
                actor_id=r.actor_id,
                actor_role=r.actor_role,
                action=r.action,
                object_type=r.object_type,
                object_id=r.object_id,
                outcome=r.outcome.value,
                client_type=r.client_type.value,
            )
            digest = record_hash(fields, prev)
            rows.append(
                (
                    r.at,
                    r.organisation_id,
                    r.actor_id,
                    r.actor_role,
                    r.action,
                    r.object_type,
                    r.object_id,
                    r.outcome.value,
                    r.client_type.value,
                    chain,
                    seq,
                    prev,
                    digest,
                )
            )
            heads[chain] = (seq, digest)
        yield rows


# --------------------------------------------------------------------------
# The process and the host.
# --------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5`` into clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads (aiosqlite's too)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Wall time, this process's CPU and the host's CPU over a phase."""

    def __enter__(self) -> Meter:
        self.wall0, self.cpu0, self.host0 = time.perf_counter(), self_cpu_s(), cpu_jiffies()
        self.load_start = loadavg()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = self_cpu_s() - self.cpu0
        busy1, total1 = cpu_jiffies()
        busy0, total0 = self.host0
        self.host_busy_pct = 100 * (busy1 - busy0) / max(1, total1 - total0)
        self.load_end = loadavg()

    def figures(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_s": round(self.wall, 3),
            f"{prefix}_self_cpu_pct": round(100 * self.cpu / max(self.wall, 1e-9), 1),
            f"{prefix}_host_busy_pct": round(self.host_busy_pct, 1),
            f"{prefix}_loadavg_1m": [self.load_start[0], self.load_end[0]],
        }


def fs_type(path: str) -> str:
    """The file system type of the mount that holds ``path``."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        mount = parts[1]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, parts[2]
    return kind


# --------------------------------------------------------------------------
# Targets: where a fresh, migrated database comes from, and goes again.
# --------------------------------------------------------------------------


@dataclass
class Target:
    name: str  # "sqlite", "sqlite-shm", "postgres"
    backend: str  # "sqlite" or "postgres"
    directory: str = ""  # SQLite: where the temp directories go

    def describe(self) -> str:
        if self.backend == "sqlite":
            return f"SQLite file in {self.directory} ({fs_type(self.directory)})"
        return f"PostgreSQL on {HOST}:5432"


# PostgreSQL databases and temp directories this process made and has not
# removed yet: main() removes whatever is left, also after Ctrl+C.
CREATED_DBS: set[str] = set()
CREATED_DIRS: set[str] = set()


def pg_dsn(args: argparse.Namespace, database: str) -> str:
    return f"postgresql://{args.pg_user}@{HOST}:{args.pg_port}/{database}"


async def pg_admin(args: argparse.Namespace, statement: str) -> None:
    await pg_execute(pg_dsn(args, args.pg_admin_db), statement)


async def drop_pg_database(args: argparse.Namespace, name: str) -> None:
    await pg_admin(args, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    CREATED_DBS.discard(name)


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    CREATED_DIRS.discard(path)


@dataclass
class Database:
    target: Target
    engine: AsyncEngine
    location: str  # the SQLite file, or the PostgreSQL database's name


@contextlib.asynccontextmanager
async def fresh_database(target: Target, args: argparse.Namespace) -> AsyncIterator[Database]:
    """A new, migrated database on ``target``; removed again on the way out."""
    if target.backend == "sqlite":
        directory = tempfile.mkdtemp(prefix="vc-bench-audit-", dir=target.directory)
        CREATED_DIRS.add(directory)
        location = str(Path(directory) / SQLITE_FILE)
        url = make_url(f"sqlite+aiosqlite:///{location}")
    else:
        location = f"vc_bench_audit_{secrets.token_hex(6)}"
        CREATED_DBS.add(location)
        await pg_admin(args, f'CREATE DATABASE "{location}"')
        url = make_url(f"postgresql+asyncpg://{args.pg_user}@{HOST}:{args.pg_port}/{location}")
    engine = create_engine(url, connect_timeout_s=args.connect_timeout)
    try:
        await upgrade(engine)
        yield Database(target, engine, location)
    finally:
        # Shielded: a Ctrl+C during the run must not leave the database behind.
        with contextlib.suppress(Exception):
            await asyncio.shield(engine.dispose())
        if target.backend == "sqlite":
            remove_dir(str(Path(location).parent))
        else:
            await asyncio.shield(drop_pg_database(args, location))


# --------------------------------------------------------------------------
# The measurements.
# --------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed_append(engine: AsyncEngine, n: int, orgs: int, latencies: list[float]) -> None:
    t0 = time.perf_counter()
    async with engine.begin() as conn:
        await append_access(conn, bench_record(n, orgs, at=dt.datetime.now(dt.UTC)))
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
) -> dict[str, Any]:
    """``count`` appends from ``tasks`` tasks (1: one after another), each its own transaction."""
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
                await timed_append(engine, base + i, orgs, latencies)
            except Exception as err:
                errors[type(err).__name__ + ": " + str(err).splitlines()[0][:120]] += 1

    with Meter() as meter:
        await asyncio.gather(*(worker(t) for t in range(tasks)))
    done = len(latencies)
    return {
        f"{prefix}_tasks": tasks,
        f"{prefix}_orgs": orgs,
        f"{prefix}_appends": done,
        f"{prefix}_appends_per_s": round(done / meter.wall, 1),
        f"{prefix}_p50_ms": round(1000 * pct(latencies, 0.5), 3),
        f"{prefix}_p99_ms": round(1000 * pct(latencies, 0.99), 3),
        f"{prefix}_errors": dict(errors),
        **meter.figures(prefix),
    }


def pool_description(engine: AsyncEngine) -> str:
    pool = engine.pool
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", None)
    if callable(size):
        return f"{type(pool).__name__}(size={size()}, max_overflow={overflow})"
    return type(pool).__name__


# The append phases: (key prefix, tasks, organisations) given the arguments.
def phases(args: argparse.Namespace) -> list[tuple[str, int, int, str]]:
    return [
        ("seq", 1, args.orgs, "sequential appends"),
        ("conc", args.concurrency, args.orgs, f"appends from {args.concurrency} tasks"),
        ("one", args.concurrency, 1, f"appends from {args.concurrency} tasks, one chain"),
    ]


async def append_run(target: Target, args: argparse.Namespace, rep: int) -> dict[str, Any]:
    async with fresh_database(target, args) as db:
        engine = db.engine
        run: dict[str, Any] = {"target": target.name, "run": rep, "pool": pool_description(engine)}
        expected = 0
        for number_, (prefix, tasks, orgs, label) in enumerate(phases(args)):
            print(f"bench: {target.name} run {rep}: {args.appends} {label} ...", flush=True)
            figures = await append_phase(
                engine,
                count=args.appends,
                tasks=tasks,
                orgs=orgs,
                deadline_s=args.phase_seconds,
                first=1 + number_ * 1_000_000,
                prefix=prefix,
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
        async with engine.connect() as conn:
            report = await verify_chain(conn)
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
    spy: subprocess.Popen[bytes] | None = None
    async with db.engine.connect() as conn:
        await conn.execute(sa.select(1))  # connected (and, on SQLite, begun) first
        rss_before = proc_status_kb("VmRSS")
        peak_reset = reset_peak_rss()
        if profile_to is not None:
            spy = start_py_spy(profile_to)
        try:
            with Meter() as meter:
                report = await asyncio.wait_for(verify_chain(conn, batch=batch), timeout_s)
        finally:
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
        async with db.engine.connect() as conn:
            await conn.execute(sa.select(1))
            started.set()
            await verify_chain(conn)

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
                    f"host busy {figures['verify_host_busy_pct']} %",
                    flush=True,
                )
        if args.probe:
            print(f"bench: {target.name}: one append during a verify ...", flush=True)
            probe = {"target": target.name, **await writer_probe(db, args)}
            results["probes"].append(probe)
            print(f"bench:   {probe}", flush=True)


# --------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------


def summary_table(results: dict[str, Any]) -> str:
    targets = [t["name"] for t in results["targets"]]
    runs = results["runs"]
    verifies = results["verifies"]
    big = results["settings"]["big_batch"]
    n = results["settings"]["verify_records"]

    def of(rows: list[dict[str, Any]], target: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r for r in rows if r["target"] == target and all(r[k] == v for k, v in match.items())
        ]

    lines = [
        "| median [min, max] | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]

    def row(label: str, rows_of: Any, key: str) -> None:
        cells = [cell([r[key] for r in rows_of(t) if r.get(key) is not None]) for t in targets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    settings = results["settings"]
    row("sequential appends/s", lambda t: of(runs, t), "seq_appends_per_s")
    row("  sequential append p50 (ms)", lambda t: of(runs, t), "seq_p50_ms")
    row("  sequential append p99 (ms)", lambda t: of(runs, t), "seq_p99_ms")
    row("  host CPU busy, sequential (% of all cores)", lambda t: of(runs, t), "seq_host_busy_pct")
    c, orgs = settings["concurrency"], settings["orgs"]
    for prefix, label in (("conc", f"{orgs} organisations"), ("one", "one organisation")):
        row(
            f"concurrent appends/s ({c} tasks, {label})",
            lambda t: of(runs, t),
            f"{prefix}_appends_per_s",
        )
        row("  append p50 (ms)", lambda t: of(runs, t), f"{prefix}_p50_ms")
        row("  append p99 (ms)", lambda t: of(runs, t), f"{prefix}_p99_ms")
        row("  host CPU busy (% of all cores)", lambda t: of(runs, t), f"{prefix}_host_busy_pct")
    for batch in [10_000, *([big] if big else [])]:
        row(
            f"verify {n:,} (s), batch {batch:,}",
            lambda t, b=batch: of(verifies, t, batch=b),
            "verify_s",
        )
        row(
            f"  records/s, batch {batch:,}",
            lambda t, b=batch: of(verifies, t, batch=b),
            "records_per_s",
        )
        row(
            f"  peak RSS during verify (MB), batch {batch:,}",
            lambda t, b=batch: of(verifies, t, batch=b),
            "peak_rss_mb",
        )
        row(
            f"  RSS before verify (MB), batch {batch:,}",
            lambda t, b=batch: of(verifies, t, batch=b),
            "rss_before_mb",
        )
        row(
            f"  host CPU busy, verify (% of all cores), batch {batch:,}",
            lambda t, b=batch: of(verifies, t, batch=b),
            "verify_host_busy_pct",
        )
    row(f"fill {n:,} (s, setup)", lambda t: of(results["fills"], t), "fill_s")
    text = "\n".join(lines) + "\n"
    for probe in results["probes"]:
        text += (
            f"\n{probe['target']}: an append a second into a verify: {probe['append_outcome']} "
            f"after {probe['append_wait_s']} s"
        )
    if results["probes"]:
        text += "\n"
    for failure in results["failures"]:
        text += f"\nFAILED: {failure}"
    return text + "\n"


def machine(args: argparse.Namespace, targets: list[Target]) -> dict[str, Any]:
    import aiosqlite

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "asyncpg": asyncpg.__version__,
        "aiosqlite": getattr(aiosqlite, "__version__", "?"),
        "sqlite": sqlite3.sqlite_version,
        "loop": LOOP,
        "commit": commit("audit"),
        "loadavg_at_start": loadavg(),
        "targets": [t.describe() for t in targets],
    }


async def postgres_settings(args: argparse.Namespace) -> dict[str, str]:
    conn = await asyncpg.connect(pg_dsn(args, args.pg_admin_db), timeout=10)
    try:
        out = {}
        for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers"):
            out[name] = str(await conn.fetchval(f"SHOW {name}"))
        return out
    finally:
        await conn.close()


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
            errors = {p: run[f"{p}_errors"] for p, *_ in phases(args) if run[f"{p}_errors"]}
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
