"""``videoconsult retention``: apply the retention settings now."""

from __future__ import annotations

import argparse
import asyncio
import sys

from tqdm import tqdm

from audit import prepare_data_dir
from audit.clock import SystemClock
from audit.recordings import FileStore
from audit.retention import Retention, count_expired, purge
from config import Settings
from server.cli.base import current_database

# Below this many rows a progress bar is only noise.
PROGRESS_FROM = 5000


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "retention",
        help="apply the retention settings",
        description="Delete what has passed its organisation's retention.",
    )
    commands = parser.add_subparsers(
        title="retention commands", metavar="RETENTION_COMMAND", required=True
    )
    run = commands.add_parser(
        "run",
        help="delete what has passed its retention now, and say what went",
        description=(
            "Delete consult records and access-log records that have passed their "
            "organisation's retention (the access log keeps a checkpoint so that it still "
            "verifies). The server does this every retention.purge_interval_s by itself."
        ),
    )
    run.add_argument(
        "--dry-run", action="store_true", help="only count what would be deleted; change nothing"
    )
    run.set_defaults(run=run_purge)


def run_purge(settings: Settings, args: argparse.Namespace) -> int:
    defaults = Retention(
        settings.retention.consult_days,
        settings.retention.recording_days,
        settings.retention.access_log_days,
    )

    async def _run() -> int:
        now = SystemClock().now()
        async with current_database(settings) as engine, engine.begin() as conn:
            total = 0 if args.dry_run else await count_expired(conn, now=now, defaults=defaults)
            with tqdm(
                total=total,
                unit="rows",
                desc="purging",
                disable=total < PROGRESS_FROM,
                file=sys.stderr,
            ) as bar:

                def advance(rows: int) -> None:
                    bar.update(rows)

                report = await purge(
                    conn, now=now, defaults=defaults, dry_run=args.dry_run, progress=advance
                )
        # The keys are gone (committed); now the files.
        FileStore.in_data_dir(prepare_data_dir(settings.data_dir)).delete_files(report.files)
        if not report.ran:
            print("another node is purging right now; nothing done")
            return 0
        verb = "would delete" if args.dry_run else "deleted"
        for org in report.organisations:
            owner = f"organisation {org.organisation_id}" if org.organisation_id else "installation"
            checkpoint = (
                f" (the chain now starts after record {org.checkpoint_seq})"
                if org.checkpoint_seq is not None and not args.dry_run
                else ""
            )
            print(
                f"{owner}: {verb} {org.recordings} recordings, {org.consults} consult records "
                f"and {org.access_log_records} access-log records{checkpoint}"
            )
        print(
            f"{'dry run: ' if args.dry_run else ''}{verb} {report.recordings} recordings, "
            f"{report.consults} consult records and "
            f"{report.access_log_records} access-log records in all"
        )
        return 0

    return asyncio.run(_run())
