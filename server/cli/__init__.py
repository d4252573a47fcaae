"""The ``videoconsult`` command line.

Each command lives in its own module in this package and is listed in
``COMMANDS``. Every failure ends with one line on stderr and a non-zero exit
code, never a traceback:

- 2: bad usage or bad settings (argparse's own messages, SettingsError);
- 1: the command could not do its work (database unreachable or busy, port in use).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sqlalchemy.exc import DBAPIError

from audit import AuditError
from audit.db import first_line, is_busy, is_outage
from config import Settings, SettingsError, load_settings
from server.cli import audit_log, billing, db, keys, org, recording, retention, serve, user
from server.cli.base import CliError, CommandModule
from server.process_log import configure_process_logging

COMMANDS: tuple[CommandModule, ...] = (
    serve,
    db,
    org,
    user,
    audit_log,
    retention,
    keys,
    recording,
    billing,
)

EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with every registered command."""
    parser = argparse.ArgumentParser(
        prog="videoconsult",
        description=(
            "Privacy-first signaling server for medical video consultations. "
            "Settings come from config/defaults.toml, the file named by "
            "VIDEOCONSULT_CONFIG_FILE, and VIDEOCONSULT_* environment variables."
        ),
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as err:
        return _fail(str(err), EXIT_USAGE)
    configure_process_logging(level=settings.logging.level, log_format=settings.log_format)
    # Everything this process creates (database, keys, recordings) is for it alone.
    os.umask(0o077)
    try:
        code: int = args.run(settings, args)
    except (CliError, AuditError) as err:
        return _fail(str(err), EXIT_FAILED)
    except DBAPIError as err:
        return _fail(_database_error(err, settings), EXIT_FAILED)
    except KeyboardInterrupt:
        return EXIT_FAILED
    return code


def _database_error(err: DBAPIError, settings: Settings) -> str:
    """One line for a database error a command did not expect: what happened,
    without the statement (SQLAlchemy's own message carries it)."""
    if is_busy(err):
        wait_s = settings.database.connect_timeout_s
        return (
            "the database is busy: another process held its write lock for longer than "
            f"database.connect_timeout_s ({wait_s:g} s); try again"
        )
    if is_outage(err):
        return f"the database cannot be reached: {first_line(err)}"
    # The driver's own text can quote the value it refused: its kind only.
    cause = err.orig if err.orig is not None else err
    sqlstate = getattr(cause, "sqlstate", None)
    return f"database error: {type(cause).__name__}" + (
        f" (SQLSTATE {sqlstate})" if sqlstate else ""
    )


def _fail(message: str, code: int) -> int:
    print(f"videoconsult: error: {message}", file=sys.stderr)
    return code
