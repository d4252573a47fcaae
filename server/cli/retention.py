"""``videoconsult retention``: apply the retention settings now."""

from __future__ import annotations

import argparse
import asyncio
import sys
from contextlib import AbstractAsyncContextManager
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tqdm import tqdm

from audit import prepare_data_dir
from audit.clock import SystemClock
from audit.db import reading
from audit.pace import PEERS_DIR
from audit.recordings import FileStore
from audit.retention import PurgeReport, Retention, count_expired, purge, purge_in_steps
from audit.technical_log import count_expired_technical, purge_technical_log
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
            "Delete technical-log entries older than 24 hours, and recordings, consult "
            "records and access-log records that have passed their organisation's "
            "retention (the access log keeps a checkpoint so that it still verifies). "
            "The server does this by itself: the technical log every 5 minutes, the rest "
            "every retention.purge_interval_s."
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
    verb = "would delete" if args.dry_run else "deleted"

    async def _retention_purge(engine: AsyncEngine, now: datetime) -> PurgeReport:
        if args.dry_run:
            async with reading(engine) as conn:
                return await purge(conn, now=now, defaults=defaults, dry_run=True)
        async with reading(engine) as conn:
            total = await count_expired(conn, now=now, defaults=defaults)
        with tqdm(
            total=total,
            unit="rows",
            desc="purging",
            disable=total < PROGRESS_FROM,
            file=sys.stderr,
        ) as bar:

            def advance(rows: int) -> None:
                bar.update(rows)

            store = FileStore.in_data_dir(prepare_data_dir(settings.data_dir))

            async def delete_files(files: list[str]) -> None:
                # Each step's keys are gone (committed): now their files.
                store.delete_files(files)

            # In steps, as the server's purge (audit.retention.STEP), and
            # always paced: this process cannot see whether the machine runs
            # consults (the server paces its own purge only while it does).
            return await purge_in_steps(
                engine,
                now=now,
                defaults=defaults,
                progress=advance,
                delete_files=delete_files,
                share=settings.database.bulk_share,
                # Shared with the paced jobs of a server on this machine.
                peers=str(settings.data_dir / PEERS_DIR),
            )

    def transaction(engine: AsyncEngine) -> AbstractAsyncContextManager[AsyncConnection]:
        # A dry run only counts: reads, which on SQLite take no write lock,
        # so it neither waits for a writer nor holds one up.
        return reading(engine) if args.dry_run else engine.begin()

    async def _run() -> int:
        now = SystemClock().now()
        async with current_database(settings) as engine:
            # In a transaction of its own, as the server's housekeeping does:
            # the 24 hours wait neither for another node's retention purge
            # nor for the outcome of this one.
            async with transaction(engine) as conn:
                if args.dry_run:
                    technical = await count_expired_technical(conn, now=now)
                else:
                    technical = await purge_technical_log(conn, now=now)
            print(f"{verb} {technical} technical-log entries older than 24 hours")
            # The files of destroyed keys go after each step's commit.
            report = await _retention_purge(engine, now)
        if not report.ran:
            print("another node is running the retention purge right now; nothing else done")
            return 0
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
        if report.unfinished:
            print(
                "the purge stopped after a step that failed (see the log); what it deleted "
                "stays deleted: run it again to go on",
                file=sys.stderr,
            )
            return 1
        return 0

    return asyncio.run(_run())
