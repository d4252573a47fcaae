"""The access-log benchmark's report: the table and the machine it ran on."""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
from typing import Any

import asyncpg
import sqlalchemy as sa
from _access_chain_setup import Target, pg_dsn
from _common import (
    LOOP,
    cell,
    commit,
    cpu_model,
    loadavg,
    memory_gib,
)

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
    for prefix, label in (
        ("conc", f"{orgs} organisations"),
        ("one", "one organisation"),
        ("gc", f"{orgs} organisations, group commit"),
        ("gcone", "one organisation, group commit"),
    ):
        row(
            f"concurrent appends/s ({c} tasks, {label})",
            lambda t: of(runs, t),
            f"{prefix}_appends_per_s",
        )
        row("  append p50 (ms)", lambda t: of(runs, t), f"{prefix}_p50_ms")
        row("  append p99 (ms)", lambda t: of(runs, t), f"{prefix}_p99_ms")
        row(
            "  appends failed",
            lambda t: of(runs, t),
            f"{prefix}_failed",
        )
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
            f"  event loop held at most (ms), batch {batch:,}",
            lambda t, b=batch: of(verifies, t, batch=b),
            "loop_lag_max_ms",
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
