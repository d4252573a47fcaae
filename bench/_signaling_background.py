"""``signaling_load.py --background``: the paced phase of ours with and without
heavy work on the same node (issues 18 and 19).

Each repetition starts one server (ours, one node, PostgreSQL) with P pairs,
warms them up, and measures the paced phase twice on the same sockets: once
with nothing else running and once with the background load, alternating
which comes first from one repetition to the next. The load is one of

- ``recordings:N``: N consults recorded through the server, as browsers do
  it (bench/_signaling_recorders.py, in a process of its own): sockets,
  admission, consent, recorder offers and answers over /ws, media replayed
  from pre-encoded VP8 and Opus into the server's recorder workers. Started
  before the phase, stopped after it; every recording must end complete.
- ``bulk``: before the server starts, a million records (``--bulk-records``)
  are written into the organisation's access-log chain and
  ``--bulk-old-records`` six-year-old ones into the installation's; during
  the phase an admin's access-log verify and CSV export run through the API
  (in the server) and ``videoconsult retention run`` purges the old records
  (a CLI process on the same PostgreSQL). The phase starts a second after
  them; the next phase waits until they are done.

Beside the latency, the server's loop lag (server/loop_lag.py) is read from
/metrics before and after each phase: the histogram's difference gives the
phase's p99 and maximum as bucket bounds ("at most"), the gauges the last
minute's. With ``--pin``, the server runs on CPU 0 and the recorder workers
and the senders' process on CPU 1 (psutil's cpu_affinity, once they run).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import psutil
from _access_chain_setup import COLUMNS, Into, chain_batches
from _common import BENCH, Invocation, client_session, loadavg
from _signaling_phase import close_sockets, measure_phase, stop_run
from _signaling_processes import PROCESSES, proc_cpu_s
from _signaling_servers import ORG, VIDEOCONSULT, OursServer
from _signaling_wire import Pair, Workload

from audit.access_log import chain_of

ADMIN_EMAIL = "bench-admin@praktijk.example"
LAG = "videoconsult_event_loop_lag"
# How long the background may take to start, and to finish after the phase.
START_TIMEOUT_S = 300.0
FINISH_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Background:
    kind: str  # "recordings" or "bulk"
    recordings: int = 0
    jobs: tuple[str, ...] = ()  # bulk's

    def __str__(self) -> str:
        if self.kind == "recordings":
            return f"recordings:{self.recordings}"
        return "bulk" if self.jobs == BULK_JOBS else "bulk:" + "+".join(self.jobs)


BULK_JOBS = ("verify", "export", "retention")


def background(text: str) -> Background:
    """``--background``'s value: ``recordings:N`` (1 to 20), ``bulk`` (all three
    jobs) or ``bulk:`` some of them joined by ``+`` (to tell which one costs)."""
    if found := re.fullmatch(r"bulk(?::([a-z+]+))?", text):
        jobs = tuple(found.group(1).split("+")) if found.group(1) else BULK_JOBS
        if set(jobs) <= set(BULK_JOBS):
            return Background("bulk", jobs=tuple(j for j in BULK_JOBS if j in jobs))
    found = re.fullmatch(r"recordings:(\d+)", text)
    if found is None or not 1 <= int(found.group(1)) <= 20:
        raise argparse.ArgumentTypeError(
            "recordings:N (N from 1 to 20), bulk, or bulk:JOB[+JOB] of verify, export, retention"
        )
    return Background("recordings", int(found.group(1)))


def add_background_arguments(parser: argparse.ArgumentParser) -> None:
    """signaling_load.py's options of the background runs."""
    what = "recordings:N, bulk or bulk:JOB[+JOB]: the paced phase of ours alone and with that load"
    parser.add_argument("--background", type=background, default=None, help=what)
    pin = "with --background: the server on CPU 0, recorder workers and senders on CPU 1"
    parser.add_argument("--pin", action="store_true", help=pin)
    nice = (
        "with --background recordings:N: the senders' process at this niceness (they stand"
        " for the patients' and therapists' browsers, on other machines: 19 keeps them from"
        " taking a core from the node they would not share)"
    )
    parser.add_argument(
        "--senders-nice", type=int, default=0, choices=range(20), metavar="N", help=nice
    )
    parser.add_argument("--bulk-records", type=int, default=1_000_000, help="the verified chain")
    parser.add_argument("--bulk-old-records", type=int, default=200_000, help="to be purged")
    share = (
        "with --background bulk: the server's database.bulk_share, the share of the time"
        " the jobs may keep busy together (default: the server's own; 1: full speed)"
    )
    parser.add_argument("--bulk-share", type=float, default=None, help=share)
    reader = (
        "with --background bulk: curl, which reads the export as the admin's browser would"
        " (on another machine), at this niceness (default 0)"
    )
    parser.add_argument(
        "--reader-nice", type=int, default=0, choices=range(20), metavar="N", help=reader
    )


# --------------------------------------------------------------------------
# The loop lag from /metrics.
# --------------------------------------------------------------------------


async def scrape_lag(session: aiohttp.ClientSession, origin: str) -> dict[str, Any]:
    """The loop-lag histogram's cumulative buckets and the two gauges."""
    async with session.get(f"{origin}/metrics") as resp:
        text = await resp.text()
    buckets: dict[float, float] = {}
    gauges: dict[str, float] = {}
    for line in text.splitlines():
        if found := re.match(rf'{LAG}_seconds_bucket{{le="([^"]+)"}} (\S+)', line):
            buckets[float(found.group(1))] = float(found.group(2))
        elif found := re.match(rf"{LAG}_(max|p99)_seconds (\S+)", line):
            gauges[found.group(1)] = float(found.group(2))
    return {"buckets": buckets, **gauges}


def lag_figures(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The phase's lags: p99 and max as the bounds of their buckets, the gauges' last minute."""
    bounds = sorted(after["buckets"])
    counts = [after["buckets"][b] - before["buckets"].get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0

    def bound(share: float) -> float:
        return next((b for b, c in zip(bounds, counts, strict=True) if c >= share * total), 0.0)

    return {
        "lag_samples": int(total),
        "lag_p99_le_ms": round(bound(0.99) * 1000, 1),
        "lag_max_le_ms": round(bound(1.0) * 1000, 1),
        "lag_gauge_p99_ms": round(after.get("p99", 0.0) * 1000, 1),
        "lag_gauge_max_ms": round(after.get("max", 0.0) * 1000, 1),
    }


# --------------------------------------------------------------------------
# Recordings.
# --------------------------------------------------------------------------


class Recordings:
    """N consults recorded through the server by bench/_signaling_recorders.py."""

    def __init__(self, server: OursServer, args: argparse.Namespace, count: int) -> None:
        self.server, self.args, self.count = server, args, count
        # One more than recorded: the limit refuses the N+1st, not the Nth.
        server.env["VIDEOCONSULT_RECORDING_MAX_CONCURRENT"] = str(count + 1)
        self.consults: list[tuple[str, str]] = []
        self.proc: subprocess.Popen[bytes] | None = None

    async def prepare(self, session: aiohttp.ClientSession) -> None:
        self.consults = [await self.server.create_consult(session) for _ in range(self.count)]

    def _event(self, wanted: str) -> dict[str, Any]:
        """The child's next event of kind ``wanted`` (blocking: call it in a thread)."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the recorders' process ended before {wanted}")
            event: dict[str, Any] = json.loads(line)
            if event["event"] == wanted:
                return event

    def _tell(self, line: str) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    async def start(self) -> None:
        spec = {
            "origin": self.server.origin,
            "cookie": self.server.cookie,
            "consults": self.consults,
            "deadline_s": START_TIMEOUT_S + FINISH_TIMEOUT_S,
            "nice": self.args.senders_nice,
        }
        self.proc = PROCESSES.start(
            [sys.executable, str(BENCH / "_signaling_recorders.py")],
            env=dict(os.environ),
            log=self.server.log_dir / "recorders.log",
            pipes=True,
        )
        self._tell(json.dumps(spec))  # on stdin, not in argv: the cookie is a secret
        await asyncio.wait_for(asyncio.to_thread(self._event, "all-on"), START_TIMEOUT_S)
        if self.args.pin:
            pin(self.server.pid, [self.proc.pid, *self.workers()])
        await asyncio.sleep(2)  # the workers past their start

    def close(self) -> None:
        if self.proc is not None:
            PROCESSES.stop(self.proc)

    def workers(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.server.pid).children(recursive=True)]

    def cpu(self) -> dict[int, float]:
        assert self.proc is not None
        return {pid: proc_cpu_s(pid) for pid in [*self.workers(), self.proc.pid]}

    async def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        self._tell("stop")
        off = await asyncio.wait_for(asyncio.to_thread(self._event, "off"), FINISH_TIMEOUT_S)
        await asyncio.to_thread(self.proc.wait, timeout=60)
        statuses = await self._statuses()
        return {
            "recordings": self.count,
            "off_reasons": sorted(set(off["reasons"])),
            "statuses": statuses,
            "all_complete": statuses == {"complete": self.count}
            and off["reasons"] == ["stopped_by_therapist"] * self.count,
        }

    async def _statuses(self) -> dict[str, int]:
        """The recordings' statuses once none is still being written (bounded)."""
        conn = await asyncpg.connect(f"postgresql://{self.server.pg}/{self.server.pg_db}")
        try:
            for _ in range(150):
                rows = await conn.fetch("SELECT status, count(*) FROM recordings GROUP BY status")
                statuses = {row["status"]: row["count"] for row in rows}
                if "recording" not in statuses:
                    break
                await asyncio.sleep(0.2)
        finally:
            await conn.close()
        return statuses


def pin(server_pid: int, others: list[int]) -> None:
    """The server on CPU 0, the others on CPU 1."""
    psutil.Process(server_pid).cpu_affinity([0])
    for pid in others:
        psutil.Process(pid).cpu_affinity([1])


# --------------------------------------------------------------------------
# Bulk jobs.
# --------------------------------------------------------------------------


class Bulk:
    """A verify and an export through the admin API, and a retention run by the CLI."""

    def __init__(self, server: OursServer, args: argparse.Namespace) -> None:
        self.server, self.args = server, args
        self.admin_token = ""
        self.admin_cookie = ""
        self.jobs: list[asyncio.Task[dict[str, Any]]] = []
        self.fill_s = 0.0
        server.before_serve = self.fill
        if args.bulk_share is not None:
            for node in server.nodes:  # the retention CLI runs with the first's
                node.env["VIDEOCONSULT_DATABASE_BULK_SHARE"] = str(args.bulk_share)

    async def fill(self, server: OursServer) -> None:
        """The organisation's chain grown by ``--bulk-records``; old ones in the installation's."""
        self.admin_token = await server.add_user("admin", ADMIN_EMAIL)
        began = time.monotonic()
        conn = await asyncpg.connect(f"postgresql://{server.pg}/{server.pg_db}")
        try:
            org = await conn.fetchval("SELECT id FROM organisations WHERE name = $1", ORG)
            head = await conn.fetchrow(
                "SELECT seq, hash, at FROM access_log WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
                chain_of(org),
            )
            # Past the access log's default retention (1825 days), so the run purges them.
            old = dt.datetime.now(dt.UTC) - dt.timedelta(days=2200)
            chains = [
                (
                    self.args.bulk_records,
                    Into(org, head["at"], seq=head["seq"], prev_hash=head["hash"]),
                ),
                (self.args.bulk_old_records, Into(None, old, step=dt.timedelta(milliseconds=1))),
            ]
            for total, into in chains:
                for rows in chain_batches(total, 10_000, 1, into):
                    await conn.copy_records_to_table("access_log", records=rows, columns=COLUMNS)
            await conn.execute("VACUUM ANALYZE access_log")
        finally:
            await conn.close()
        self.fill_s = round(time.monotonic() - began, 1)

    async def prepare(self, session: aiohttp.ClientSession) -> None:
        self.admin_cookie = await self.server.enrol(session, self.admin_token, ADMIN_EMAIL)

    async def _get(self, session: aiohttp.ClientSession, path: str) -> dict[str, Any]:
        """One admin request (the verify), its small body read to the end."""
        began = time.monotonic()
        headers = {"Origin": self.server.origin, "Cookie": self.admin_cookie}
        size, last = 0, b""
        # A paced verify of a million records takes minutes (database.bulk_share).
        timeout = aiohttp.ClientTimeout(total=FINISH_TIMEOUT_S)
        async with session.get(self.server.origin + path, headers=headers, timeout=timeout) as resp:
            async for chunk in resp.content.iter_chunked(1 << 16):
                size, last = size + len(chunk), chunk
            figures: dict[str, Any] = {"status": resp.status, "bytes": size}
        if path.endswith("/verify"):
            figures["intact"] = json.loads(last).get("intact") if size == len(last) else None
        return figures | {"s": round(time.monotonic() - began, 1)}

    async def _export(self) -> dict[str, Any]:
        """The whole log as CSV, read to the end by curl, a process of its own:
        read here, its 225 MB would share this process's event loop with the
        signaling messages it times (an admin's download is another machine's
        work)."""
        began = time.monotonic()
        niceness = self.args.reader_nice
        curl = await asyncio.create_subprocess_exec(
            "nice",
            "-n",
            str(niceness),
            "curl",
            "-sS",
            "-H",
            "@-",  # the headers on stdin, not in argv: the cookie is a secret
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            self.server.origin + "/api/admin/access-log/export?format=csv",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        headers = f"Origin: {self.server.origin}\nCookie: {self.admin_cookie}\n"
        out, _ = await curl.communicate(headers.encode())
        status, size = out.decode().split() if curl.returncode == 0 else ("0", "0")
        return {
            "status": int(status),
            "bytes": int(size),
            "read_by": "curl" if niceness == 0 else f"curl at niceness {niceness}",
            "s": round(time.monotonic() - began, 1),
        }

    async def _retention(self) -> dict[str, Any]:
        """``videoconsult retention run`` with the server's settings."""
        began = time.monotonic()
        log = self.server.log_dir / "retention-run.log"
        proc = PROCESSES.start(
            [str(VIDEOCONSULT), "retention", "run"], env=self.server.env, log=log
        )
        try:
            code = await asyncio.to_thread(proc.wait, timeout=FINISH_TIMEOUT_S)
        finally:
            PROCESSES.stop(proc)
        said = log.read_text().strip().splitlines()
        return {
            "exit": code,
            "said": said[-1] if said else "",
            "s": round(time.monotonic() - began, 1),
        }

    async def start(self, session: aiohttp.ClientSession) -> None:
        jobs = {
            "verify": lambda: self._get(session, "/api/admin/access-log/verify"),
            "export": self._export,
            "retention": self._retention,
        }
        self.jobs = [asyncio.create_task(jobs[name]()) for name in self.args.background.jobs]
        await asyncio.sleep(1)

    async def stop(self) -> dict[str, Any]:
        done = await asyncio.wait_for(asyncio.gather(*self.jobs), FINISH_TIMEOUT_S)
        return {"fill_s": self.fill_s, **dict(zip(self.args.background.jobs, done, strict=True))}

    def close(self) -> None:
        for job in self.jobs:
            job.cancel()


# --------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------


async def phase(
    server: OursServer,
    work: Workload,
    pairs: list[Pair],
    args: argparse.Namespace,
    session: aiohttp.ClientSession,
    load: Recordings | Bulk | None,
) -> dict[str, Any]:
    """One paced phase, with ``load`` running (started before, finished after) or alone."""
    if isinstance(load, Recordings):
        await load.start()
    elif isinstance(load, Bulk):
        await load.start(session)
    cpu_before = load.cpu() if isinstance(load, Recordings) else {}
    lag_before = await scrape_lag(session, server.origin)
    began = time.monotonic()
    paced = await measure_phase(server, work, pairs, args, interval_s=args.paced_interval)
    elapsed = time.monotonic() - began
    result = paced | lag_figures(lag_before, await scrape_lag(session, server.origin))
    result["load_average"] = loadavg()
    if isinstance(load, Recordings):
        assert load.proc is not None
        used = {pid: proc_cpu_s(pid) - cpu for pid, cpu in cpu_before.items()}
        senders = used.pop(load.proc.pid)
        result |= {
            "workers": len(used),
            "workers_cpu_pct": round(sum(used.values()) / elapsed * 100, 1),
            "worker_cpu_pct_mean": round(sum(used.values()) / max(1, len(used)) / elapsed * 100, 1),
            "senders_cpu_pct": round(senders / elapsed * 100, 1),
        }
    if load is not None:
        result["background"] = await load.stop()
    return result


async def background_run(
    server: OursServer, args: argparse.Namespace, n_pairs: int, rep: int
) -> dict[str, Any]:
    """One repetition: the paced phase alone and with the load, in the order ``rep`` says."""
    spec: Background = args.background
    load: Recordings | Bulk = (
        Recordings(server, args, spec.recordings)
        if spec.kind == "recordings"
        else Bulk(server, args)
    )
    result: dict[str, Any] = {"pairs": n_pairs, "run": rep + 1, "background": str(spec)}
    readers: list[asyncio.Task[None]] = []
    try:
        await server.start()
        if args.pin:
            psutil.Process(server.pid).cpu_affinity([0])
        async with client_session() as session:
            prepared = await asyncio.wait_for(
                server.prepare(session, n_pairs, args.setup_concurrency), args.setup_timeout
            )
            await load.prepare(session)
            work = Workload(server.codec, args.candidates, args.shape)
            pairs = await asyncio.wait_for(
                server.open_pairs(
                    session, prepared, n_pairs, args.setup_concurrency, work.reading(readers)
                ),
                args.setup_timeout,
            )
            await work.drive(
                pairs, duration_s=3600, rounds=1, jitter_s=0.5, round_timeout_s=args.round_timeout
            )
            order = ["alone", "with"] if rep % 2 == 0 else ["with", "alone"]
            for name in order:
                await asyncio.sleep(1)
                figures = await phase(
                    server, work, pairs, args, session, load if name == "with" else None
                )
                result[name] = figures
            await close_sockets(pairs, readers)
            server.stop()
    finally:
        load.close()  # on an error: the recorders' process, the jobs
        await stop_run(server, readers)
    alone, with_ = result["alone"], result["with"]
    result["p99_ratio"] = round(with_["p99_ms"] / alone["p99_ms"], 2) if alone["p99_ms"] else None
    result["order"] = order
    return result


async def background_runs(
    args: argparse.Namespace,
    make_server: Callable[[], OursServer],
    results: dict[str, Any],
    invocation: Invocation,
) -> None:
    """``--runs`` repetitions at every ``--pairs``; a failed one is listed and skipped."""
    results["background"] = {
        "load": str(args.background),
        "pinned": "server on CPU 0; recorder workers and senders on CPU 1" if args.pin else "no",
    }
    for n_pairs in [n for n in args.pairs if n]:
        for rep in range(args.runs):
            what = f"ours pairs={n_pairs} background={args.background} run={rep + 1}"
            if invocation.over_budget(what):
                continue
            print(f"bench: {what} ...", flush=True)
            try:
                run = await asyncio.wait_for(
                    background_run(make_server(), args, n_pairs, rep), args.run_timeout
                )
            except Exception as err:
                print(f"bench: {what} failed: {err!r}", flush=True)
                results["skipped"].append(f"{what}: failed: {err!r}")
                invocation.save()
                continue
            results["runs"].append(run)
            invocation.save()
            print(f"bench:   {one_line(run)}", flush=True)


def clean_run(run: dict[str, Any]) -> bool:
    """Nothing lost in either phase, and every recording (if any) complete."""
    lost = run["alone"]["lost"] or run["with"]["lost"]
    return not lost and run["with"]["background"].get("all_complete", True) is True


def one_line(run: dict[str, Any]) -> str:
    alone, with_ = run["alone"], run["with"]
    text = (
        f"p99 {alone['p99_ms']} -> {with_['p99_ms']} ms (x{run['p99_ratio']}), "
        f"p50 {alone['p50_ms']} -> {with_['p50_ms']} ms, lost {alone['lost']}+{with_['lost']}, "
        f"loop lag p99 <= {alone['lag_p99_le_ms']} -> {with_['lag_p99_le_ms']} ms, "
        f"max <= {alone['lag_max_le_ms']} -> {with_['lag_max_le_ms']} ms"
    )
    if "workers_cpu_pct" in with_:
        text += (
            f", {with_['workers']} workers {with_['workers_cpu_pct']}% "
            f"(senders {with_['senders_cpu_pct']}%), "
            f"complete {with_['background']['all_complete']}"
        )
    return text + f"; {json.dumps(with_['background'])}"
