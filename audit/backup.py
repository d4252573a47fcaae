"""A backup of the database without the technical log.

The technical log holds personal diagnostics (client addresses, browsers)
for 24 hours at most (DESIGN.md, promise 2). A copy of the database kept for
weeks would keep them that long, outside the purge's reach: a backup made
here leaves the technical log's rows out, and nothing of them stays in the
file (SQLite: the copy's free pages are rebuilt by ``VACUUM``; PostgreSQL:
``pg_dump --exclude-table-data``). The table itself is kept, empty, so that
a restored database is complete.

Everything else is in the backup as it is in the database: what the master
key seals (labels, references, recordings' data keys, webhook secrets) stays
sealed, and a backup opens nothing of it without that key, which is not in
it (``security.master_key``, kept apart). Recordings' files are not in the
database at all: they live, encrypted, in the file store.

The file is made with mode 0600 and never replaces an existing one.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from audit.schema import technical_log

# What is left out, by table name.
LEFT_OUT = (technical_log.name,)
# pg_dump's options beyond the connection's: the custom format (compressed,
# for pg_restore), no ownership or privileges (restored by whoever restores).
PG_DUMP_OPTIONS = ("--format=custom", "--no-owner", "--no-privileges")
# asyncpg's URL query options that libpq (pg_dump) reads from the environment.
_PG_QUERY_ENV = {"ssl": "PGSSLMODE", "sslmode": "PGSSLMODE", "host": "PGHOST", "port": "PGPORT"}
# asyncpg also takes ssl=true and ssl=false; libpq knows only the modes.
_SSL_WORDS = {"true": "require", "false": "disable"}


class BackupFailed(Exception):
    """The backup could not be made; nothing was left at its path. The message says why."""


@dataclass(frozen=True)
class Backup:
    path: Path
    size: int
    kind: str  # "SQLite" or "PostgreSQL (pg_dump custom format)"


def create_private(out: Path) -> None:
    """Make ``out``, empty, for this user alone; never replace a file."""
    try:
        os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise BackupFailed(f"{out} exists already: name a new file") from None
    except OSError as err:
        raise BackupFailed(f"{out} cannot be created: {err.strerror}") from None


def backup(url: URL, out: Path) -> Backup:
    """Write a backup of the database at ``url`` to the new file ``out``.

    Blocking (a copy of the whole database): run it in a thread, or from the
    command line. Raises :class:`BackupFailed`, with ``out`` removed."""
    create_private(out)
    # The copy's own journal holds its pages for a moment: private too.
    previous = os.umask(0o077)
    try:
        if url.get_backend_name() == "sqlite":
            # A relative path in database.url counts from where the command runs.
            _sqlite(Path(url.database or "").absolute(), out)
            kind = "SQLite"
        else:
            _postgres(url, out)
            kind = "PostgreSQL (pg_dump custom format)"
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    finally:
        os.umask(previous)
    return Backup(out, out.stat().st_size, kind)


def _sqlite(source: Path, out: Path) -> None:
    try:
        # Read-only: a running server's writes go on; SQLite's backup copies a
        # consistent state of the database (WAL included).
        src = sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as err:
        raise BackupFailed(f"the database {source} cannot be opened: {err}") from None
    try:
        dst = sqlite3.connect(out, isolation_level=None)
        try:
            src.backup(dst)
            for table in LEFT_OUT:
                # Our own table names, not input.
                dst.execute(f'DELETE FROM "{table}"')  # noqa: S608
            # A new file without the deleted rows' pages (DELETE only frees them).
            dst.execute("VACUUM")
        finally:
            dst.close()
    except sqlite3.Error as err:
        raise BackupFailed(f"the backup of {source} failed: {err}") from None
    finally:
        src.close()


def _postgres(url: URL, out: Path) -> None:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise BackupFailed(
            "pg_dump is not installed: install PostgreSQL's client tools of your "
            "server's version or newer (Debian: postgresql-client)"
        )
    command = [
        pg_dump,
        *PG_DUMP_OPTIONS,
        *(f"--exclude-table-data={table}" for table in LEFT_OUT),
        f"--file={out}",
    ]
    try:
        # Our own arguments, no shell.
        done = subprocess.run(  # noqa: S603
            command, env=pg_environment(url), capture_output=True, text=True, check=False
        )
    except OSError as err:
        raise BackupFailed(f"pg_dump could not run: {err.strerror}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit code {done.returncode}"
        raise BackupFailed(f"pg_dump failed: {why}")


def pg_environment(url: URL) -> dict[str, str]:
    """libpq's environment for ``url``, over the operator's own (a CA file in
    PGSSLROOTCERT, a PGPASSFILE stay): the password never on a command line."""
    environ = dict(os.environ)
    given: dict[str, str | None] = {
        "PGHOST": url.host,
        "PGPORT": None if url.port is None else str(url.port),
        "PGUSER": url.username,
        "PGPASSWORD": None if url.password is None else str(url.password),
        "PGDATABASE": url.database,
    }
    for name, value in given.items():
        if value:
            environ[name] = value
    for option, values in url.query.items():
        variable = _PG_QUERY_ENV.get(option)
        if variable is not None:
            value = values if isinstance(values, str) else values[-1]
            environ[variable] = _SSL_WORDS.get(value.lower(), value) if option == "ssl" else value
    return environ
