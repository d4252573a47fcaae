#!/usr/bin/env python3
"""How long an access-log export holds the server's event loop (issue 19, goal 1).

Run from the repository root; ``PYTHONPATH`` picks the code measured (the
shared .venv's editable install is the main checkout's):

    PYTHONPATH=. .venv/bin/python bench/export_loop.py --records 200000 --runs 3

One fresh PostgreSQL database (127.0.0.1:5432, user postgres; dropped again
afterwards, also after an error), the real app in this process (aiohttp's
test server, on this process's event loop), an admin enrolled and logged in
through the API, and ``--records`` records COPYed into the organisation's
chain after its head (bench/_access_chain_setup.py's records). Each run
exports the whole log as CSV with curl, a process of its own (so that the
client's reading costs this loop nothing), while a loop-lag watcher
(server/loop_lag.py, probing every 2 ms) measures the loop; then the same
watcher as long again with nothing to do, for the host's own noise. It
prints each run's export (bytes, seconds), the server process's CPU time
meanwhile (its own: not curl's, not a worker's), the loop's longest hold and
its p99 during the export and at rest, and their medians.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from typing import Any

import asyncpg
from _access_chain_setup import COLUMNS, Into, chain_batches
from aiohttp.test_utils import TestClient, TestServer

from audit.access_log import chain_of
from audit.clock import ManualClock
from audit.roles import Role
from config import load_settings
from server import create_app
from server.loop_lag import LoopLag
from tests.support.harness import Harness
from tests.support.processes import session_cookie
from tests.support.settings import CHEAP_PASSWORD_HASHING

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PROBE_S = 0.002


async def fill(dsn: str, organisation_id: Any, records: int) -> None:
    """``records`` records into the organisation's chain, after its head, by COPY."""
    conn = await asyncpg.connect(dsn)
    try:
        chain = chain_of(organisation_id)
        head = await conn.fetchrow(
            "SELECT seq, hash, at FROM access_log WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
            chain,
        )
        into = Into(organisation_id, head["at"], seq=head["seq"], prev_hash=head["hash"])
        for rows in chain_batches(records, 20_000, 1, into=into):
            await conn.copy_records_to_table("access_log", records=rows, columns=COLUMNS)
        await conn.execute("ANALYZE access_log")
    finally:
        await conn.close()


async def export_once(url: str, cookie: str) -> tuple[int, float, float, float, float]:
    """One CSV export read by curl: its bytes and seconds, the loop's most and
    p99, and this process's CPU seconds (the server's; not its children's)."""
    watcher = LoopLag(warn_after_s=60.0, probe_s=PROBE_S)
    watcher.start()
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        curl = await asyncio.create_subprocess_exec(
            "curl",
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            "-b",
            f"vc_session={cookie}",
            f"{url}/api/admin/access-log/export?format=csv",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await curl.communicate()
        took_s = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
    finally:
        watcher.stop()
    if curl.returncode != 0:
        raise SystemExit(f"curl failed with exit status {curl.returncode}")
    most, p99 = watcher.window()
    return int(out), took_s, most, p99, cpu_s


async def at_rest(seconds: float) -> tuple[float, float]:
    watcher = LoopLag(warn_after_s=60.0, probe_s=PROBE_S)
    watcher.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        watcher.stop()
    return watcher.window()


async def bench(args: argparse.Namespace) -> None:
    name = f"bench_export_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            settings = load_settings(
                {
                    "VIDEOCONSULT_DATA_DIR": data_dir,
                    "VIDEOCONSULT_DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}",
                    **CHEAP_PASSWORD_HASHING,
                }
            )
            clock = ManualClock()
            client = TestClient(TestServer(create_app(settings, clock=clock)))
            await client.start_server()
            try:
                harness = Harness(client.app, client, clock)
                who = await harness.professional("admin@praktijk.example", Role.ADMIN)
                await harness.logged_in(who)
                await fill(
                    f"postgresql://postgres@127.0.0.1:5432/{name}",
                    who.organisation.id,
                    args.records,
                )
                url = str(client.make_url("")).rstrip("/")
                rows = []
                for run in range(1, args.runs + 1):
                    size, took_s, most, p99, cpu_s = await export_once(url, session_cookie(harness))
                    rest_most, rest_p99 = await at_rest(took_s)
                    rows.append((took_s, most, p99, rest_most, rest_p99, cpu_s))
                    print(
                        f"run {run}: {size / 1e6:.1f} MB in {took_s:.2f} s, server CPU "
                        f"{cpu_s:.2f} s; loop held at most "
                        f"{most * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms (at rest: "
                        f"{rest_most * 1e3:.1f}, {rest_p99 * 1e3:.1f} ms)",
                        flush=True,
                    )
            finally:
                await client.close()
        medians = [statistics.median(column) for column in zip(*rows, strict=True)]
        print(
            f"medians of {args.runs}: export {medians[0]:.2f} s, server CPU {medians[5]:.2f} s;"
            f" loop held at most "
            f"{medians[1] * 1e3:.1f} ms, p99 {medians[2] * 1e3:.1f} ms (at rest: "
            f"{medians[3] * 1e3:.1f}, {medians[4] * 1e3:.1f} ms)"
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
