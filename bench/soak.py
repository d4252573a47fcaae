#!/usr/bin/env python3
"""Soak: 1,000 consults joining, relaying, dropping, reconnecting and leaving
for 10 minutes on one server node, on loopback.

Run from the repository root (see docs/benchmarks.md, "Soak"):

    .venv/bin/pip install --require-hashes --no-deps -r requirements/bench.txt
    .venv/bin/python bench/soak.py                 # 1,000 consults, 10 minutes

The benchmark starts ``videoconsult serve`` on 127.0.0.1 on a fresh
PostgreSQL database (with ``--redis``: on Redis as well), enrols and logs in
one therapist, and runs ``--consults`` slots at once. Each slot lives one
consult after another until the time is up (bench/_soak_consults.py tells a
life: create, join, admit, negotiate, sometimes a drop and a return within
the grace period, leave by ``end``, by ``bye`` or by a drop for good).

Measured from outside the server process: its resident memory (psutil,
every ``--sample-s`` seconds), its open file descriptors and their kinds, and
its asyncio tasks (the ``videoconsult_asyncio_tasks`` gauge of ``/metrics``,
scraped on a fresh connection). At the end it checks the issue's criteria:

- RSS growth under 5 %: the median of the last minute against the median of
  the minute after the warm-up (``--warmup-minutes``, default 3);
- no leaked file descriptors or tasks: once every client has gone and the
  last grace period has run out, the server's descriptors (other than its
  database and Redis connections, whose pools keep a few) and its tasks are
  back to what they were before the first client; no participant is left;
- 0 lost messages: every relayed message carries a sequence number per
  direction; all that were sent arrived, once and in order, and every
  message sent to a participant who was away was refused with
  ``peer_absent``;
- every consult's life went as the protocol says.

Only 127.0.0.1 is contacted. Every wait is bounded, the whole invocation by
``--max-minutes``, and every process it started is killed on the way out,
also on errors and Ctrl+C. Exit status 0 when every check passed, 1 when one
failed, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import traceback
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from _common import (
    HOST,
    Invocation,
    cancel_on_signals,
    client_session,
    commit,
    cpu_jiffies,
    machine,
    number,
    raise_fd_limit,
    run_main,
)
from _signaling_processes import PROCESSES, find_redis, loopback_redis, proc_cpu_s
from _signaling_servers import OursServer
from _soak_consults import Life, Mix, Tally

# The criterion: resident memory grows less than this after the warm-up.
RSS_GROWTH_LIMIT = 0.05
# The server's default grace period: a consult whose patient dropped for good
# ends this long after the drop.
GRACE_S = 30


# --------------------------------------------------------------------------
# The server, seen from outside.
# --------------------------------------------------------------------------


def port_of(url: str, default: int) -> int:
    """The port of a ``user@host:port`` or ``redis://host:port/db`` address."""
    if "://" in url:
        return urllib.parse.urlsplit(url).port or default
    return int(url.rpartition(":")[2] or default) if ":" in url else default


class Watch:
    """The server process from outside: memory, descriptors and their kinds,
    CPU, and its ``/metrics``."""

    def __init__(self, server: OursServer, *, pg_port: int, redis_port: int | None) -> None:
        self.server = server
        self.proc = psutil.Process(server.pid)
        self.pg_port = pg_port
        self.redis_port = redis_port
        self.scraper = aiohttp.ClientSession(
            # A fresh connection per scrape, closed after it: no kept-alive
            # connection of ours (and its task) in the server between scrapes.
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        await self.scraper.close()

    def fds(self) -> dict[str, int]:
        """Open descriptors: all, and by kind: the connections to the database,
        to Redis, from clients, the listening socket, other sockets, and the
        rest by what they are (``anon_inode:[eventpoll]``, ``pipe``, ``file``)."""
        inet = {conn.fd: conn for conn in self.proc.net_connections(kind="inet")}
        kinds: Counter[str] = Counter()
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for entry in fd_dir.iterdir():
            try:
                target = os.readlink(entry)
            except FileNotFoundError:
                continue  # closed meanwhile
            conn = inet.get(int(entry.name))
            port = conn.raddr.port if conn is not None and conn.raddr else None
            if conn is None:
                if target.startswith("socket:"):
                    kinds["other socket"] += 1  # a Unix socket, say
                elif target.startswith("pipe:"):
                    kinds["pipe"] += 1
                elif target.startswith("anon_inode:"):
                    kinds[target] += 1
                else:
                    kinds["file"] += 1
            elif port == self.pg_port:
                kinds["database"] += 1
            elif self.redis_port is not None and port == self.redis_port:
                kinds["redis"] += 1
            elif conn.status == psutil.CONN_LISTEN:
                kinds["listening"] += 1
            else:
                kinds["clients"] += 1
        total = sum(kinds.values())
        # Everything but the pools' connections to PostgreSQL and Redis.
        return {"total": total, "own": total - kinds["database"] - kinds["redis"], **kinds}

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    async def metrics(self) -> dict[str, float]:
        """The unlabelled samples and the participants of one scrape."""
        async with self.scraper.get(f"{self.server.origin}/metrics") as resp:
            if resp.status != 200:
                raise RuntimeError(f"/metrics: {resp.status}")
            text = await resp.text()
        wanted = {
            "videoconsult_asyncio_tasks": "tasks",
            "videoconsult_consults_active": "consults_active",
            "videoconsult_patients_waiting": "patients_waiting",
            'videoconsult_signaling_participants{role="therapist"}': "therapists",
            'videoconsult_signaling_participants{role="patient"}': "patients",
        }
        found: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name in wanted:
                found[wanted[name]] = float(value)
        if "tasks" not in found:
            raise RuntimeError("the server has no videoconsult_asyncio_tasks gauge")
        return found

    async def quiet(self, scrapes: int = 5, gap_s: float = 1.0) -> dict[str, Any]:
        """The server at rest: the smallest task count of a few scrapes (a
        background job may be running at any one of them), descriptors, RSS."""
        seen = []
        for k in range(scrapes):
            if k:
                await asyncio.sleep(gap_s)
            seen.append(await self.metrics())
        least = min(seen, key=lambda m: m["tasks"])
        await asyncio.sleep(gap_s)  # the last scrape's connection closed on both ends
        return {
            "tasks": int(least["tasks"]),
            "tasks_seen": [int(m["tasks"]) for m in seen],
            "participants": int(least.get("therapists", 0) + least.get("patients", 0)),
            "consults_active": int(least.get("consults_active", 0)),
            "fds": self.fds(),
            "rss_mb": round(self.rss() / 2**20, 1),
        }


class Sampler:
    """RSS, descriptors and CPU every ``sample_s``; tasks every ``scrape_s``."""

    def __init__(self, watch: Watch, tally: Tally, *, sample_s: float, scrape_s: float) -> None:
        self.watch = watch
        self.tally = tally
        self.sample_s = sample_s
        self.scrape_s = scrape_s
        self.samples: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.errors: list[str] = []

    async def run(self) -> None:
        last_scrape = -1e9
        while True:
            now = time.monotonic()
            sample: dict[str, Any] = {
                "t_s": round(now - self.started, 1),
                "rss_mb": round(self.watch.rss() / 2**20, 2),
                "fds": self.watch.fds()["total"],
                "server_cpu_s": round(proc_cpu_s(self.watch.proc.pid), 2),
                "client_cpu_s": round(proc_cpu_s(os.getpid()), 2),
                "host_jiffies": cpu_jiffies(),
                "lives": self.tally.lives_started,
                "relayed": sum(self.tally.received),
            }
            if now - last_scrape >= self.scrape_s:
                last_scrape = now
                try:
                    sample.update(await self.watch.metrics())
                except Exception as err:  # a scrape that fails is noted, not fatal
                    if len(self.errors) < 10:
                        self.errors.append(repr(err))
            self.samples.append(sample)
            await asyncio.sleep(max(0.0, self.sample_s - (time.monotonic() - now)))


# --------------------------------------------------------------------------
# The soak.
# --------------------------------------------------------------------------


def make_mix(args: argparse.Namespace) -> Mix:
    return Mix(
        pause_s=(args.pause[0], args.pause[1]),
        drop_patient=args.drop_patient,
        drop_therapist=args.drop_therapist,
        leave_end=args.leave_end,
        leave_bye=args.leave_bye,
        candidates=args.candidates,
    )


async def churn(
    server: OursServer,
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    tally: Tally,
    deadline: float,
) -> None:
    """``args.consults`` slots, each living one consult after another until ``deadline``."""
    mix = make_mix(args)
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def create() -> tuple[str, str]:
        async with gate:
            return await server.create_consult(session)

    async def open_therapist(consult_id: str) -> aiohttp.ClientWebSocketResponse:
        async with gate:
            return await server.open_therapist(session, consult_id)

    async def open_patient(invite: str) -> aiohttp.ClientWebSocketResponse:
        async with gate:
            return await server.open_patient(session, invite)

    async def reopen_therapist(consult_id: str) -> aiohttp.ClientWebSocketResponse:
        return await server.open_therapist(session, consult_id)

    async def reopen_patient(invite: str) -> aiohttp.ClientWebSocketResponse:
        return await server.open_patient(session, invite)

    async def slot(index: int) -> None:
        rng = random.Random(args.seed * 100_003 + index)
        # The slots start spread over the ramp, not all at once; at the end
        # they leave spread over a minute as well.
        await asyncio.sleep(args.ramp * index / args.consults)
        leave_by = deadline + rng.uniform(0, 60)
        while time.monotonic() < deadline:
            life = Life(tally, mix, rng, deadline=leave_by)
            tally.lives_started += 1
            try:
                await life.run(
                    create, open_therapist, open_patient, reopen_therapist, reopen_patient
                )
                tally.lives_completed += 1
            except Exception as err:  # counted and shown: the soak goes on
                tally.fail(f"{type(err).__name__}: {err}")
                await life.abandon()
                await asyncio.sleep(1)  # not a tight loop when the server refuses

    await asyncio.gather(*(slot(i) for i in range(args.consults)))


def window_median(samples: list[dict[str, Any]], start_s: float, end_s: float) -> float:
    values = [s["rss_mb"] for s in samples if start_s <= s["t_s"] < end_s]
    return statistics.median(values) if values else float("nan")


def percentile_ms(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] / 1e6, 2)


def figures(
    args: argparse.Namespace,
    tally: Tally,
    samples: list[dict[str, Any]],
    soak_s: float,
    before: dict[str, Any],
    after: dict[str, Any],
) -> dict[str, Any]:
    """What the soak measured, from the tally and the samples."""
    warm_s = args.warmup_minutes * 60
    ref = window_median(samples, warm_s, warm_s + 60)
    last = window_median(samples, soak_s - 60, soak_s + 1)
    in_soak = [s for s in samples if s["t_s"] <= soak_s]
    first_warm = next((s for s in in_soak if s["t_s"] >= warm_s), in_soak[-1])
    end = in_soak[-1]
    span = max(1e-9, end["t_s"] - first_warm["t_s"])
    jiffies = (end["host_jiffies"][0] - first_warm["host_jiffies"][0]) / max(
        1, end["host_jiffies"][1] - first_warm["host_jiffies"][1]
    )
    tasks = [s["tasks"] for s in in_soak if "tasks" in s and s["t_s"] >= warm_s]
    # Consults with a participant connected: running, or a patient waiting.
    live = [
        s["consults_active"] + s.get("patients_waiting", 0)
        for s in in_soak
        if "consults_active" in s and s["t_s"] >= warm_s
    ]
    participants = [
        s["therapists"] + s["patients"] for s in in_soak if "therapists" in s and s["t_s"] >= warm_s
    ]
    fds = [s["fds"] for s in in_soak if s["t_s"] >= warm_s]
    lats = list(tally.latencies_ns)
    return {
        "soak_s": round(soak_s, 1),
        "warmup_s": warm_s,
        "lives": tally.lives_started,
        "lives_completed": tally.lives_completed,
        "lives_failed": tally.lives_failed,
        "failure_samples": tally.failure_samples,
        "lives_per_s": round(tally.lives_started / soak_s, 1),
        "scenarios": dict(tally.scenarios),
        "sockets_opened": tally.sockets_opened,
        "negotiations": tally.negotiations,
        "sent_therapist_to_patient": tally.sent[0],
        "received_therapist_to_patient": tally.received[0],
        "sent_patient_to_therapist": tally.sent[1],
        "received_patient_to_therapist": tally.received[1],
        "lost": tally.lost,
        "out_of_order": tally.out_of_order,
        "probes_sent": tally.probes_sent,
        "probes_refused": tally.probes_refused,
        "unexpected_errors": tally.unexpected_errors,
        "error_samples": tally.error_samples,
        "relayed_per_s": round(sum(tally.received) / soak_s, 1),
        "latency_p50_ms": percentile_ms(lats, 0.5),
        "latency_p99_ms": percentile_ms(lats, 0.99),
        "rss_mb_after_warmup": round(ref, 1),
        "rss_mb_last_minute": round(last, 1),
        "rss_growth_pct": round((last - ref) / ref * 100, 2),
        "rss_mb_max": round(max(s["rss_mb"] for s in in_soak), 1),
        "fds_after_warmup": first_warm["fds"],
        "fds_at_end": end["fds"],
        "fds_range_after_warmup": [min(fds), max(fds)] if fds else [],
        "tasks_range_after_warmup": [min(tasks), max(tasks)] if tasks else [],
        "consults_live_median": statistics.median(live) if live else None,
        "consults_live_range": [min(live), max(live)] if live else [],
        "participants_median": statistics.median(participants) if participants else None,
        "server_cpu_pct": round((end["server_cpu_s"] - first_warm["server_cpu_s"]) / span * 100, 1),
        "client_cpu_pct": round((end["client_cpu_s"] - first_warm["client_cpu_s"]) / span * 100, 1),
        "host_busy_pct": round(jiffies * 100, 1),
        "before_clients": before,
        "after_clients": after,
    }


def checks(found: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's criteria, each passed or not, with what was measured."""
    before, after = found["before_clients"], found["after_clients"]
    growth = found["rss_growth_pct"]
    return [
        {
            "check": f"RSS growth after warm-up < {RSS_GROWTH_LIMIT * 100:g} %",
            "measured": f"{growth:+.2f} % ({found['rss_mb_after_warmup']} → "
            f"{found['rss_mb_last_minute']} MB)",
            "ok": growth < RSS_GROWTH_LIMIT * 100,
        },
        {
            "check": "file descriptors back to baseline (all but DB/Redis connections)",
            "measured": f"{before['fds']['own']} → {after['fds']['own']} "
            f"(total {before['fds']['total']} → {after['fds']['total']}; database "
            f"{before['fds'].get('database', 0)} → {after['fds'].get('database', 0)})",
            "ok": after["fds"]["own"] == before["fds"]["own"],
        },
        {
            "check": "asyncio tasks back to baseline",
            "measured": f"{before['tasks']} → {after['tasks']}",
            "ok": after["tasks"] == before["tasks"],
        },
        {
            "check": "no participant or consult left in the server",
            "measured": f"participants {after['participants']}, "
            f"consults active {after['consults_active']}",
            "ok": after["participants"] == 0 and after["consults_active"] == 0,
        },
        {
            "check": "0 lost messages (and none doubled or out of order)",
            "measured": f"lost {found['lost']}, out of order {found['out_of_order']}",
            "ok": found["lost"] == 0 and found["out_of_order"] == 0,
        },
        {
            "check": "every message to an absent peer refused (peer_absent)",
            "measured": f"{found['probes_refused']} of {found['probes_sent']}",
            "ok": found["probes_refused"] == found["probes_sent"],
        },
        {
            "check": "every consult's life as the protocol says",
            "measured": f"{found['lives_failed']} of {found['lives']} failed, "
            f"{found['unexpected_errors']} unexpected errors",
            "ok": found["lives_failed"] == 0 and found["unexpected_errors"] == 0,
        },
    ]


async def soak(server: OursServer, args: argparse.Namespace, results: dict[str, Any]) -> None:
    tally = Tally()
    await server.start()
    watch = Watch(
        server,
        pg_port=port_of(args.pg, 5432),
        redis_port=port_of(args.redis, 6379) if args.use_redis else None,
    )
    sampler_task: asyncio.Task[None] | None = None
    try:
        async with client_session() as session:
            await server.login(session)
        await asyncio.sleep(args.settle_s)
        before = await watch.quiet()
        results["before_clients"] = before
        print(f"soak: before the clients: {before}", flush=True)

        sampler = Sampler(watch, tally, sample_s=args.sample_s, scrape_s=args.scrape_s)
        sampler_task = asyncio.create_task(sampler.run())
        deadline = time.monotonic() + args.minutes * 60
        progress = asyncio.create_task(report_progress(tally, sampler, deadline))
        try:
            async with client_session() as session:
                await asyncio.wait_for(
                    churn(server, session, args, tally, deadline),
                    timeout=args.minutes * 60 + args.drain_s,
                )
        finally:
            progress.cancel()
        # The figures are of the churn until the deadline, not of the last leaves.
        soak_s = deadline - sampler.started
        open_here = sum(
            1
            for conn in psutil.Process().net_connections(kind="inet")
            if conn.raddr and conn.raddr.port == server.port
        )
        results["client_sockets_left_open"] = open_here
        print(f"soak: every client gone ({open_here} sockets left); settling ...", flush=True)
        # The last consults left by a drop end when their grace period runs out.
        await asyncio.sleep(GRACE_S + args.settle_s)
        sampler_task.cancel()
        after = await watch.quiet()
        results["after_clients"] = after
        print(f"soak: after the clients: {after}", flush=True)
        results["samples"] = sampler.samples
        results["sampler_errors"] = sampler.errors
        results["figures"] = figures(args, tally, sampler.samples, soak_s, before, after)
        results["checks"] = checks(results["figures"])
    finally:
        if sampler_task is not None:
            sampler_task.cancel()
        await watch.close()


async def report_progress(tally: Tally, sampler: Sampler, deadline: float) -> None:
    """A line a minute: how far, and the server's memory."""
    while True:
        await asyncio.sleep(60)
        last = sampler.samples[-1] if sampler.samples else {}
        print(
            f"soak: {max(0.0, deadline - time.monotonic()) / 60:.1f} min left; "
            f"lives {tally.lives_started} ({tally.lives_failed} failed), "
            f"relayed {sum(tally.received)}, in flight {tally.lost}, "
            f"RSS {last.get('rss_mb')} MB, fds {last.get('fds')}, "
            f"tasks {next((s['tasks'] for s in reversed(sampler.samples) if 'tasks' in s), '?')}",
            flush=True,
        )


def summary_table(results: dict[str, Any]) -> str:
    found = results.get("figures")
    if not found:
        return "soak: no figures (the run failed; see above)\n"
    out = ["| check | measured | result |", "|---|---|---|"]
    for c in results["checks"]:
        out.append(f"| {c['check']} | {c['measured']} | {'pass' if c['ok'] else '**FAIL**'} |")
    scen = ", ".join(f"{k} {v}" for k, v in sorted(found["scenarios"].items()))
    out += [
        "",
        "| figure | value |",
        "|---|---|",
        f"| consults' lives (new consults), per second | {found['lives']:,} "
        f"({number(found['lives_per_s'])}/s) |",
        f"| what they did | {scen} |",
        f"| consults live at once after warm-up (server's gauges): median, range | "
        f"{found['consults_live_median']}, {found['consults_live_range']} |",
        f"| participants connected after warm-up: median | {found['participants_median']} |",
        f"| sockets opened | {found['sockets_opened']:,} |",
        f"| negotiations | {found['negotiations']:,} |",
        f"| relayed therapist → patient: sent / arrived | "
        f"{found['sent_therapist_to_patient']:,} / {found['received_therapist_to_patient']:,} |",
        f"| relayed patient → therapist: sent / arrived | "
        f"{found['sent_patient_to_therapist']:,} / {found['received_patient_to_therapist']:,} |",
        f"| relayed per second; latency p50 / p99 (ms) | {number(found['relayed_per_s'])}; "
        f"{found['latency_p50_ms']} / {found['latency_p99_ms']} |",
        f"| server RSS: minute after warm-up / last minute / max (MB) | "
        f"{found['rss_mb_after_warmup']} / {found['rss_mb_last_minute']} / "
        f"{found['rss_mb_max']} |",
        f"| server fds after warm-up, at the end, range | {found['fds_after_warmup']}, "
        f"{found['fds_at_end']}, {found['fds_range_after_warmup']} |",
        f"| server tasks after warm-up, range | {found['tasks_range_after_warmup']} |",
        f"| CPU after warm-up: server / load generator (% of a core), host (% of 2) | "
        f"{found['server_cpu_pct']} / {found['client_cpu_pct']}, {found['host_busy_pct']} |",
    ]
    return "\n".join(out) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    cancel_on_signals()
    fds = raise_fd_limit(4 * args.consults + 1000)
    results: dict[str, Any] = {
        "kind": "soak",
        "machine": machine(),
        "code": commit("server", "signaling", "audit", "config"),
        "settings": vars(args),
        "fd_limit": fds,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    invocation = Invocation(results, kind="soak", max_minutes=args.max_minutes)
    if args.use_redis:
        await find_redis(args.redis)
    server = OursServer(
        invocation.out_dir,
        rate_per_s=args.rate_per_s,
        burst=args.burst,
        pg=args.pg,
        topology="single-redis" if args.use_redis else "single",
        redis_url=args.redis,
    )
    results["server"] = server.describe()
    print(
        f"soak: {args.consults} consults for {args.minutes} min on {server.topology} "
        f"(results in {invocation.out_dir})",
        flush=True,
    )
    try:
        await asyncio.wait_for(soak(server, args, results), timeout=args.max_minutes * 60)
    except Exception as err:
        print(f"soak: failed: {err!r}", flush=True)
        traceback.print_exc()
        results["error"] = repr(err)
    finally:
        await server.cleanup()
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    invocation.finish(summary_table)
    ok = "checks" in results and all(c["ok"] for c in results["checks"])
    print(f"soak: {'PASS' if ok else 'FAIL'}", flush=True)
    if args.json:
        summary = {k: v for k, v in results.items() if k != "samples"}
        summary["passed"] = ok
        text = json.dumps(summary, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            await asyncio.to_thread(Path(args.json).write_text, text)
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--consults", type=int, default=1000, help="consults live at once")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the consults churn")
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        default=3.0,
        help="the warm-up: RSS growth is the last minute's median against the median "
        "of the minute after it",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="hard cap of the whole invocation, setup and teardown included "
        "(default: --minutes + 6)",
    )
    parser.add_argument(
        "--ramp", type=float, default=120.0, help="seconds over which the slots start"
    )
    parser.add_argument(
        "--pause",
        type=float,
        nargs=2,
        default=[30.0, 60.0],
        metavar=("MIN", "MAX"),
        help="seconds before each negotiation (uniform); each life has 2 to 4 "
        "negotiations, and 2 to 4 more after a drop",
    )
    parser.add_argument("--drop-patient", type=float, default=0.25, help="share of lives")
    parser.add_argument("--drop-therapist", type=float, default=0.15, help="share of lives")
    parser.add_argument("--leave-end", type=float, default=0.5, help="share of lives")
    parser.add_argument(
        "--leave-bye",
        type=float,
        default=0.35,
        help="share of lives; the rest leave by the patient's drop for good",
    )
    parser.add_argument("--candidates", type=int, default=8, help="trickle candidates per side")
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=16,
        help="API requests and socket opens under way at once",
    )
    parser.add_argument("--sample-s", type=float, default=2.0, help="RSS and fd sampling period")
    parser.add_argument("--scrape-s", type=float, default=10.0, help="/metrics scraping period")
    parser.add_argument(
        "--settle-s",
        type=float,
        default=5.0,
        help="seconds of rest before the baseline, and after the last grace period",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=180.0,
        help="how long the lives under way at the deadline may take to leave",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--rate-per-s",
        type=float,
        default=20.0,
        help="signaling.rate_per_s (the server's default)",
    )
    parser.add_argument("--burst", type=int, default=60, help="signaling.burst (the default)")
    parser.add_argument(
        "--pg",
        default=f"postgres@{HOST}:5432",
        help="user@host:port of the PostgreSQL server (loopback only)",
    )
    parser.add_argument(
        "--redis",
        nargs="?",
        const=f"redis://{HOST}:6379/0",
        default="",
        help="run the node on Redis (loopback only; default URL redis://127.0.0.1:6379/0); "
        "a key prefix of its own, deleted afterwards",
    )
    parser.add_argument(
        "--json", default="", help="also write the summary as JSON to this file ('-': stdout)"
    )
    args = parser.parse_args(argv)
    args.use_redis = bool(args.redis)
    if args.use_redis:
        try:
            loopback_redis(args.redis)
        except ValueError as err:
            parser.error(str(err))
    else:
        args.redis = f"redis://{HOST}:6379/0"  # not used
    if args.max_minutes <= 0:
        args.max_minutes = args.minutes + 6
    if args.minutes < args.warmup_minutes + 2:
        parser.error("--minutes must leave at least 2 minutes after the warm-up")
    if not 0 <= args.drop_patient + args.drop_therapist <= 1:
        parser.error("--drop-patient + --drop-therapist must be within 0..1")
    if not 0 <= args.leave_end + args.leave_bye <= 1:
        parser.error("--leave-end + --leave-bye must be within 0..1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(main_async(args), PROCESSES.stop_all)


if __name__ == "__main__":
    sys.exit(main())
