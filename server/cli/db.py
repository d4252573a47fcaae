"""``videoconsult db``: the database schema, and its backup.

A backup (``db backup OUT``) leaves out the technical log (it lives 24
hours, a backup much longer: :mod:`audit.backup`) and is recorded in the
installation's access-log chain (actor "operator", client "cli",
``database.backup``, object ``database`` with the backup's id; if it fails,
``database.backup.failed`` too): it reads everything the database holds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path

from audit import (
    current_revision,
    database_url,
    describe_url,
    head_revision,
    open_database,
    prepare_data_dir,
)
from audit.backup import Backup, BackupFailed, backup
from config import Settings
from server.cli.base import CliError, current_database, record_operator_access


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "db",
        help="manage the database schema",
        description="Manage the database schema (SQLite in the data directory by default).",
    )
    commands = parser.add_subparsers(title="db commands", metavar="DB_COMMAND", required=True)
    upgrade = commands.add_parser(
        "upgrade",
        help="apply every pending migration (all or nothing)",
        description="Apply every pending migration in one transaction.",
    )
    upgrade.set_defaults(run=run_upgrade)
    current = commands.add_parser(
        "current",
        help="show the schema revision of the database",
        description="Show the database's schema revision and the newest one this code knows.",
    )
    current.set_defaults(run=run_current)
    saving = commands.add_parser(
        "backup",
        help="write a backup of the database to a new file, without the technical log",
        description=(
            "Write a backup of the database to OUT, a new file (mode 0600; an existing file is "
            "never replaced): SQLite's online backup, or pg_dump's custom format for "
            "PostgreSQL (restore it with pg_restore). The technical log's rows are left out: "
            "they live 24 hours, a backup much longer. The server may keep running. What the "
            "master key seals stays sealed: keep security.master_key apart from the backup "
            "(docs/backups.md)."
        ),
    )
    saving.add_argument("out", metavar="OUT", type=Path, help="the new file")
    saving.set_defaults(run=run_backup)


def run_upgrade(settings: Settings, _args: argparse.Namespace) -> int:
    _stop_at_once_on_signals()
    return asyncio.run(_report(settings, migrate=True))


def _stop_at_once_on_signals() -> None:
    """Make Ctrl+C and SIGTERM end the command at once.

    The driver does not let a cancellation interrupt a connection attempt, so
    asyncio's own Ctrl+C handling waited for the whole connect timeout. Leaving
    at once is safe: the upgrade is one transaction, which the database rolls
    back when the connection goes (SQLite on its next open).
    """

    def _abort(signum: int, _frame: object) -> None:
        print(
            "videoconsult: interrupted; the database is unchanged (the migration "
            "runs in one transaction)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, _abort)
    signal.signal(signal.SIGTERM, _abort)


def run_current(settings: Settings, _args: argparse.Namespace) -> int:
    url = database_url(settings, settings.data_dir)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").exists():
        # Looking must not create: no empty database file, nor its directory.
        print(f"database {describe_url(url)}: none yet (run `videoconsult db upgrade`)")
        return 0
    return asyncio.run(_report(settings, migrate=False))


async def _report(settings: Settings, *, migrate: bool) -> int:
    data_dir = prepare_data_dir(settings.data_dir)
    engine = await open_database(settings, data_dir, migrate=migrate)
    try:
        revision = await current_revision(engine)
    finally:
        await engine.dispose()
    head = head_revision()
    where = describe_url(engine.url)
    state = "up to date" if revision == head else f"behind, newest is {head}"
    print(f"database {where}: revision {revision or 'none'} ({state})")
    return 0


def run_backup(settings: Settings, args: argparse.Namespace) -> int:
    out: Path = args.out
    backup_id = uuid.uuid4()

    async def note(action: str) -> None:
        async with current_database(settings) as engine:
            await record_operator_access(
                engine,
                organisation_id=None,
                action=action,
                object_type="database",
                object_id=backup_id,
            )

    if out.exists():
        raise CliError(f"{out} exists already: name a new file")
    # Recorded first, so the backup holds its own record.
    asyncio.run(note("database.backup"))
    url = database_url(settings, settings.data_dir)
    try:
        made: Backup = backup(url, out)
    except BackupFailed as err:
        asyncio.run(note("database.backup.failed"))
        raise CliError(f"{err}; nothing was written") from None
    print(f"backup {backup_id} of {describe_url(url)} written to {out}")
    print(f"  {made.kind}, {made.size} bytes; the technical log is left out")
    print("  keep security.master_key apart: without it nothing sealed in the backup opens")
    return 0
