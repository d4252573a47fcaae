"""The recording benchmark's verdicts and report: whether a run kept up, the
figures of a consult, the tables, the machine it ran on."""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from typing import Any

import aiortc
import av
import cryptography
from _common import (
    LOOP,
    cell,
    commit,
    cpu_model,
    loadavg,
)

PASS_FRAME_SHARE = 0.95
PASS_BACKLOG_S = 0.5


def judge(run: dict[str, Any]) -> list[str]:
    """Why a capacity run fails (empty: it passes)."""
    problems = []
    for consult, file in enumerate(run["files"], 1):
        if not file["complete"]:
            problems.append(f"consult {consult}: file not complete")
        problems += [f"consult {consult}: {f}" for f in file["failures"]]
        for stream in file["streams"]:
            name = f"consult {consult} {stream['label']}"
            if stream["share"] < PASS_FRAME_SHARE:
                problems.append(f"{name}: {stream['frames']} of {stream['expected']} frames")
            if stream["backlog_at_stop_s"] > PASS_BACKLOG_S:
                problems.append(f"{name}: source {stream['backlog_at_stop_s']} s behind")
    return problems


def consult_figures(
    rep: int, gen: dict[str, Any], rec: dict[str, Any], refs: list[dict[str, Any]]
) -> dict[str, Any]:
    file = rec["files"][0]
    gen_rate = gen["cpu_s"] / gen["wall_s"]
    rec_rate = rec["cpu_s"] / rec["wall_s"]
    figures: dict[str, Any] = {
        "run": rep,
        "recorder_cpu_s_per_min": round(60 * (rec_rate - gen_rate), 2),
        "record_total_cpu_s_per_min": round(60 * rec_rate, 2),
        "generate_cpu_s_per_min": round(60 * gen_rate, 2),
        "file_mb_per_min": round(file["file_bytes"] / file["elapsed_s"] * 60 / 1e6, 2),
    }
    for ref in refs:
        figures["pyav_mux_cpu_s_per_min"] = round(60 * ref["muxing_cpu_s"] / ref["media_s"], 2)
        figures["pyav_mux_mb_per_min"] = round(ref["bytes"] / ref["media_s"] * 60 / 1e6, 2)
    return {
        **figures,
        "min_frame_share": min(s["share"] for s in file["streams"]),
        "video_frames": [s["frames"] for s in file["streams"] if s["kind"] == "video"],
        "host_busy_pct": rec["busy_pct"],
        "problems": judge(rec),
    }


def summary_table(results: dict[str, Any]) -> str:
    consults, capacity, store = results["consults"], results["capacity"], results["store"]
    s = results["settings"]
    lines = [
        f"One consult ({s['seconds']:.0f} s per run, not pinned)",
        "",
        "| median [min, max] | value |",
        "|---|---|",
    ]

    def row(label: str, values: list[float]) -> None:
        lines.append(f"| {label} | {cell(values)} |")

    def of(key: str) -> list[float]:
        return [c[key] for c in consults]

    row("recorder CPU s per minute of consult", of("recorder_cpu_s_per_min"))
    row("  recording process in all (with the sources)", of("record_total_cpu_s_per_min"))
    row("  the synthetic sources alone", of("generate_cpu_s_per_min"))
    row(
        "  reference: PyAV alone muxing the same frames into WebM, CPU s per minute",
        of("pyav_mux_cpu_s_per_min"),
    )
    row("encrypted file MB per minute", of("file_mb_per_min"))
    row("  reference: PyAV alone, MB per minute", of("pyav_mux_mb_per_min"))
    row("lowest share of frames in the file", of("min_frame_share"))
    row("host busy during the recording (% of all cores)", of("host_busy_pct"))
    row(
        f"consults one core records at once (largest N that passed; cpu{s['cpu']})",
        [r["largest_passing"] for r in results["capacity_runs"]],
    )
    row(
        "  CPU-bound estimate: 100 % / one consult's share of the pinned core",
        [100 / c["cpu_pct_of_core"] for c in capacity if c["consults"] == 1],
    )
    lines += [
        "",
        f"N consults at once, pinned to cpu{s['cpu']} ({s['capacity_seconds']:.0f} s per run)",
        "",
        "| N | passed | process CPU (% of the core) | core busy (%) | others on the core (%) "
        "| lowest frame share | worst backlog at stop (s) | worst source lag p99 (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted({c["consults"] for c in capacity}):
        rows = [c for c in capacity if c["consults"] == n]
        passed = sum(1 for c in rows if not c["problems"])
        keys = (
            "cpu_pct_of_core",
            "busy_pct",
            "others_pct",
            "min_frame_share",
            "worst_backlog_s",
            "worst_lag_p99_s",
        )
        lines.append(
            f"| {n} | {passed} of {len(rows)} | "
            + " | ".join(cell([c[k] for c in rows]) for k in keys)
            + " |"
        )
    lines += [
        "",
        f"Store, {s['store_mib']} MiB of plaintext in 64 KiB writes (chunk size 64 KiB)",
        "",
        "| MB/s (10^6 bytes of plaintext per second) | median [min, max] |",
        "|---|---|",
    ]
    for key, label in (
        ("aesgcm_alone_mb_s", "reference: AESGCM.encrypt alone, 64 KiB chunks"),
        ("writer_null_mb_s", "EncryptingWriter to a null sink"),
        ("writer_file_mb_s", "EncryptingWriter to a file (page cache)"),
        ("writer_file_fsync_mb_s", "EncryptingWriter to a file, fsync at the end"),
        ("decrypt_file_mb_s", "decrypt_chunks from the file"),
    ):
        row(label, [r[key] for r in store])
    text = "\n".join(lines) + "\n"
    for problem in results["failures"]:
        text += f"\nFAILED: {problem}"
    for what in results["skipped"]:
        text += f"\nSKIPPED (time budget spent): {what}"
    return text + "\n"


def machine(args: argparse.Namespace) -> dict[str, Any]:
    from cryptography.hazmat.backends.openssl.backend import backend

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiortc": aiortc.__version__,
        "av": av.__version__,
        "ffmpeg": {k: ".".join(map(str, v)) for k, v in av.library_versions.items()},
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
        "loop": LOOP,
        "tmp": tempfile.gettempdir(),
        "commit": commit("signaling", "audit"),
        "loadavg_at_start": loadavg(),
    }
