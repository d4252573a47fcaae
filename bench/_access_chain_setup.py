"""What the access-log benchmark works on: its records, the host's readings, and
the databases it makes and removes again."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import resource
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    HOST,
    cpu_jiffies,
    loadavg,
    pg_execute,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.access_log import (
    GENESIS_HASH,
    OPERATOR,
    AccessRecord,
    ClientType,
    Outcome,
    canonical_fields,
    chain_of,
    record_hash,
)
from audit.db import create_engine
from audit.migrate import upgrade

SQLITE_FILE = "videoconsult.db"

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


@dataclass(frozen=True)
class Into:
    """One existing chain that every record goes into, after its head: an
    organisation's (or the installation's, ``None``), the records ``step``
    apart from ``first_at`` on."""

    organisation_id: uuid.UUID | None
    first_at: dt.datetime
    step: dt.timedelta = dt.timedelta(microseconds=1)
    seq: int = 0
    prev_hash: str = GENESIS_HASH


def bench_record(
    n: int, orgs: int, at: dt.datetime | None = None, into: Into | None = None
) -> AccessRecord:
    """Record ``n``: of one of ``orgs`` organisations (1: all in one chain), or of ``into``'s."""
    action, object_type = ACTIONS[n % len(ACTIONS)]
    if into is None:
        by_operator = orgs > 1 and n % 97 == 0
        organisation_id = None if by_operator else uuid.UUID(int=ORG_BASE + n % orgs)
    else:
        by_operator = into.organisation_id is None
        organisation_id = into.organisation_id
        at = into.first_at + n * into.step
    return AccessRecord(
        # Distinct times with microseconds, as real ones have.
        at=at or T0 + dt.timedelta(microseconds=n * 1_000 + n % 997),
        organisation_id=organisation_id,
        actor_id=None if by_operator else ACTORS[n % len(ACTORS)],
        actor_role=OPERATOR if by_operator else ("therapist" if n % 5 else "admin"),
        action=action,
        object_type=object_type,
        object_id=str(uuid.UUID(int=(0x0C << 64) + n)),
        outcome=Outcome.REFUSED if n % 23 == 0 else Outcome.ALLOWED,
        client_type=ClientType.CLI if by_operator else CLIENTS[n % len(CLIENTS)],
    )


def chain_batches(
    total: int, batch: int, orgs: int, into: Into | None = None
) -> Iterator[list[tuple[Any, ...]]]:
    """The rows (in COLUMNS order) of ``total`` records in their chains, ``batch`` at a time."""
    heads: dict[str, tuple[int, str]] = {}
    if into is not None:
        heads[chain_of(into.organisation_id)] = (into.seq, into.prev_hash)
    for start in range(1, total + 1, batch):
        rows = []
        for n in range(start, min(start + batch, total + 1)):
            r = bench_record(n, orgs, into=into)
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
