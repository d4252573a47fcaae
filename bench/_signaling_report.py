"""The signaling benchmark's report: py-spy's stacks summed up, and the tables."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from _common import (
    cell,
    number,
)

# --------------------------------------------------------------------------
# py-spy's collapsed stacks, summed up.
# --------------------------------------------------------------------------

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


# Buckets for the samples, matched from the innermost frame outwards: the
# first frame that matches decides where the sample's time goes.
CATEGORIES = [
    ("pydantic validation (parse_inbound)", ("validate_python",)),
    ("pydantic model_dump (_relay)", ("model_dump",)),
    ("json decode (stdlib json.loads)", ("json/decoder.py", "loads (json/")),
    ("json encode (stdlib json.dumps in send_json)", ("json/encoder.py", "dumps (json/")),
    ("database (SQLAlchemy/asyncpg/aiosqlite)", ("sqlalchemy/", "asyncpg/", "aiosqlite/")),
    ("logging (structlog/logging)", ("structlog/", "logging/")),
    (
        "socket writes (write/writev system calls)",
        ("_SelectorSocketTransport.write", "writev (libc", "write (libc"),
    ),
    ("socket reads (read system calls)", ("read (libc",)),
    ("cycle collector (gc)", ("gc_collect",)),
    ("aiohttp WebSocket frame writing", ("_websocket/writer", "send_frame", "send_str")),
    (
        "aiohttp reading: HTTP/WS frame parsing, receive",
        ("web_protocol.py", "_websocket/reader", "web_ws.py"),
    ),
    (
        "room store / broker in process (signaling/inprocess.py, subscribers.py)",
        ("signaling/inprocess.py", "signaling/subscribers.py"),
    ),
    # Before redis-py's own "redis/", which these paths contain too.
    ("room store / broker on Redis (signaling/redis/)", ("signaling/redis/",)),
    ("Redis client (redis-py: commands, reply parsing, pool)", ("redis/",)),
    ("rate limiter", ("signaling/ratelimit.py",)),
    (
        "rooms logic (signaling/rooms.py, deadlines.py, changes.py, state.py, protocol.py)",
        (
            "signaling/rooms.py",
            "signaling/deadlines.py",
            "signaling/changes.py",
            "signaling/state.py",
            "signaling/protocol.py",
        ),
    ),
    ("socket glue (server/ws/)", ("server/ws/",)),
    ("asyncio event loop, epoll, callbacks", ("asyncio/", "selectors.py")),
]


def analyse_profile(path: Path, top: int = 30) -> str:
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        if any(f.startswith("_worker (concurrent/futures/thread.py") for f in frames) and not any(
            f.startswith("run (concurrent/futures/thread.py") for f in frames
        ):
            # An idle thread-pool worker waiting for work (with --native its
            # innermost frame is the futex wait in libc), not CPU.
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        for frame in reversed(frames):
            name = next((c for c, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if name is not None:
                buckets[name] += n
                break
        else:
            buckets["other"] += n
    if not total:
        return "py-spy recorded no samples\n"
    lines = [f"py-spy samples on CPU: {total}", "", "## where the time goes (innermost match)"]
    lines += [f"{n / total * 100:5.1f}%  {c}" for c, n in buckets.most_common()]
    lines += ["", "## self time (top functions)"]
    lines += [f"{n / total * 100:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "## inclusive time (top functions)"]
    lines += [f"{n / total * 100:5.1f}%  {f}" for f, n in inclusive.most_common(top * 2)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# The whole benchmark.
# --------------------------------------------------------------------------

METRICS = [
    ("msgs_per_s", "saturated: relayed msg/s"),
    ("negotiations_per_s", "saturated: negotiations/s (18 messages each)"),
    ("p50_ms", "saturated: latency p50 (ms)"),
    ("p99_ms", "saturated: latency p99 (ms)"),
    ("lost", "saturated: lost messages"),
    ("errors", "saturated: error replies"),
    ("server_cpu_us_per_msg", "saturated: server CPU per msg (µs)"),
    ("server_cpu_pct", "saturated: server CPU (% of a core)"),
    ("busiest_node_cpu_pct", "saturated: busiest node's CPU (% of a core)"),
    ("redis_cpu_pct", "saturated: Redis server CPU (% of a core)"),
    ("client_cpu_pct", "saturated: load generator CPU (% of a core)"),
    ("host_busy_pct", "saturated: host CPU busy (% of 2 cores)"),
    ("paced_msgs_per_s", "paced: relayed msg/s"),
    ("paced_p50_ms", "paced: latency p50 (ms)"),
    ("paced_p99_ms", "paced: latency p99 (ms)"),
    ("paced_lost", "paced: lost messages"),
    ("paced_server_cpu_us_per_msg", "paced: server CPU per msg (µs)"),
    ("paced_server_cpu_pct", "paced: server CPU (% of a core)"),
    ("paced_redis_cpu_pct", "paced: Redis server CPU (% of a core)"),
    ("paced_host_busy_pct", "paced: host CPU busy (% of 2 cores)"),
    ("server_peak_rss_mb", "server peak RSS (MB, all nodes)"),
    ("redis_clients", "Redis connections after the saturated phase (all clients)"),
    ("setup_s", "setup time (s)"),
]


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def runs_cell(runs: list[dict[str, Any]] | None, key: str) -> str:
    """The median of ``key`` over ``runs``, and the range when there were several."""
    return cell([r[key] for r in runs or [] if key in r])


def summary_table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run.get("config", run["server"]), run["pairs"]), []).append(run)
    pairs = sorted({p for _, p in cells})
    servers = list(dict.fromkeys(s for s, _ in cells))  # configurations, as they ran
    head = ["metric: median [min, max]"] + [f"{s} @ {p}" for p in pairs for s in servers]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in METRICS:
        row = [label]
        for p in pairs:
            for s in servers:
                row.append(runs_cell(cells.get((s, p)), key))
        if any(c != "-" for c in row[1:]):
            out.append("| " + " | ".join(row) + " |")
    row = ["runs"]
    for p in pairs:
        for s in servers:
            row.append(str(len(cells.get((s, p), []))))
    out.append("| " + " | ".join(row) + " |")
    out += against_single(cells, pairs, servers)
    idle = results.get("idle", [])
    if idle:
        out += [
            "",
            "| idle connections | server | KB per connection | RSS before → after (MB) "
            "| server CPU while idle (% of a core) | runs |",
            "|---|---|---|---|---|---|",
        ]
        by_server: dict[str, list[dict[str, Any]]] = {}
        for r in idle:
            by_server.setdefault(r["server"], []).append(r)
        for s, rs in by_server.items():
            out.append(
                f"| {rs[0]['connections']} | {s} | {runs_cell(rs, 'kb_per_connection')} | "
                f"{median_of(rs, 'rss_mb_before'):g} → {median_of(rs, 'rss_mb_after'):g} | "
                f"{runs_cell(rs, 'idle_cpu_pct')} | {len(rs)} |"
            )
    return "\n".join(out) + "\n"


def against_single(
    cells: dict[tuple[str, int], list[dict[str, Any]]], pairs: list[int], configs: list[str]
) -> list[str]:
    """Our other topologies against one node without Redis: throughput ratio and
    latency added (differences of the medians), per P."""
    others = [c for c in configs if c.startswith("ours ")]
    if "ours" not in configs or not others:
        return []
    head = ["against ours (one node, no Redis), medians"] + [
        f"{c} @ {p}" for p in pairs for c in others
    ]
    rows = [
        ("msgs_per_s", "saturated throughput (x one node)", "ratio"),
        ("p50_ms", "saturated p50 added (ms)", "diff"),
        ("p99_ms", "saturated p99 added (ms)", "diff"),
        ("paced_p50_ms", "paced p50 added (ms)", "diff"),
        ("paced_p99_ms", "paced p99 added (ms)", "diff"),
        ("server_cpu_us_per_msg", "server CPU per msg, all nodes (x one node)", "ratio"),
    ]
    out = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, how in rows:
        row = [label]
        for p in pairs:
            base = median_of(cells.get(("ours", p), []), key)
            for c in others:
                value = median_of(cells.get((c, p), []), key)
                if how == "ratio":
                    row.append(f"{value / base:.2f}" if base else "-")
                else:
                    row.append(number(value - base))
        out.append("| " + " | ".join(row) + " |")
    return out


BACKGROUND_METRICS = [
    ("p50_ms", "paced latency p50 (ms)"),
    ("p99_ms", "paced latency p99 (ms)"),
    ("max_ms", "paced latency max (ms)"),
    ("lost", "lost messages"),
    ("msgs_per_s", "relayed msg/s"),
    ("server_cpu_pct", "server CPU (% of a core)"),
    ("host_busy_pct", "host CPU busy (% of 2 cores)"),
    ("lag_p99_le_ms", "loop lag p99 in the phase, at most (ms, /metrics histogram)"),
    ("lag_max_le_ms", "loop lag max in the phase, at most (ms, /metrics histogram)"),
    ("lag_gauge_p99_ms", "loop lag p99 gauge at the phase's end (ms, last minute)"),
    ("lag_gauge_max_ms", "loop lag max gauge at the phase's end (ms, last minute)"),
    ("workers_cpu_pct", "recorder workers' CPU, all (% of a core)"),
    ("worker_cpu_pct_mean", "recorder worker's CPU, each (% of a core)"),
    ("senders_cpu_pct", "senders' process CPU (% of a core)"),
]


def background_table(results: dict[str, Any]) -> str:
    """``--background``: the paced phase alone and with the load, medians and each run."""
    runs = results["runs"]
    load = results.get("background", {}).get("load", "?")
    head = ["metric", "alone: median [min, max]", f"with {load}", "each run: alone → with"]
    out = ["| " + " | ".join(head) + " |", "|---|---|---|---|"]
    for key, label in BACKGROUND_METRICS:
        alone = [r["alone"][key] for r in runs if key in r["alone"]]
        with_ = [r["with"][key] for r in runs if key in r["with"]]
        if not alone and not with_:
            continue
        each = "; ".join(f"{r['alone'].get(key, '-')} → {r['with'].get(key, '-')}" for r in runs)
        out.append(f"| {label} | {cell(alone)} | {cell(with_)} | {each} |")
    ratios = [r["p99_ratio"] for r in runs if r.get("p99_ratio") is not None]
    out.append(f"| p99 with ÷ p99 alone | {cell(ratios)} | | {'; '.join(map(str, ratios))} |")
    out.append(f"| runs (pairs) | {len(runs)} ({', '.join(str(r['pairs']) for r in runs)}) | | |")
    out.append("")
    for r in runs:
        out.append(f"- run {r['run']} ({' then '.join(r['order'])}): {r['with']['background']}")
    return "\n".join(out) + "\n"
