"""``videoconsult db backup``: a backup without the technical log, restored.

Run as an operator runs it, in a process of its own, on SQLite and on the
real PostgreSQL (with the real pg_dump and pg_restore). The technical log's
rows carry a client address that must not be anywhere in the backup's bytes:
the technical log lives 24 hours, a backup much longer.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from audit.backup import pg_environment
from audit.db import SQLITE_FILE_NAME
from tests.support.cli import assert_one_clear_error, cli_env, run_cli
from tests.support.databases import create_database, drop_database
from tests.support.services import (
    POSTGRES_ADMIN_URL,
    asyncpg_dsn,
    postgres_problem,
    service_unavailable,
)

pytestmark = pytest.mark.slow

# A documentation address (RFC 5737), in the technical log only.
ADDRESS = "198.51.100.77"
EMAIL = "backup-admin@noord.example"
ENTRIES = 300


def _practice(env: dict[str, str]) -> None:
    for args in (
        ("db", "upgrade"),
        ("org", "add", "Praktijk Noord"),
        ("user", "add", "--org", "Praktijk Noord", "--role", "admin", "--email", EMAIL),
    ):
        done = run_cli(*args, env=env)
        assert done.returncode == 0, done.stderr


def _backup_id(stdout: str) -> str:
    found = re.search(r"backup ([0-9a-f-]{36}) ", stdout)
    assert found, stdout
    return found.group(1)


async def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, check=True
    )


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_sqlite_backup_keeps_the_practice_leaves_the_technical_log_out_and_restores(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    env = cli_env(data_dir)
    _practice(env)
    with sqlite3.connect(data_dir / SQLITE_FILE_NAME) as db:
        db.executemany(
            "INSERT INTO technical_log (at, kind, subject, detail) VALUES (?, ?, NULL, ?)",
            [
                ("2026-12-07 17:00:00.000000", "ice.failed", f'{{"client_address": "{ADDRESS}"}}')
                for _ in range(ENTRIES)
            ],
        )
    assert ADDRESS.encode() in (data_dir / SQLITE_FILE_NAME).read_bytes()

    out = tmp_path / "backup.db"
    done = run_cli("db", "backup", str(out), env=env)

    assert done.returncode == 0, done.stderr
    assert "the technical log is left out" in done.stdout
    assert _private(out)
    assert ADDRESS.encode() not in out.read_bytes()
    with sqlite3.connect(out) as copy:
        assert copy.execute("SELECT count(*) FROM technical_log").fetchone() == (0,)
        assert copy.execute("SELECT email FROM accounts").fetchall() == [(EMAIL,)]
        # The backup holds its own access record (written before the copy).
        assert copy.execute(
            "SELECT actor_role, client_type, object_type, object_id, chain FROM access_log "
            "WHERE action = 'database.backup'"
        ).fetchall() == [("operator", "cli", "database", _backup_id(done.stdout), "installation")]
    # The server's database keeps its technical log.
    with sqlite3.connect(data_dir / SQLITE_FILE_NAME) as db:
        assert db.execute("SELECT count(*) FROM technical_log").fetchone() == (ENTRIES,)

    # Restored: the backup in a data directory of its own, as docs/backups.md says.
    restored = tmp_path / "restored"
    restored.mkdir(mode=0o700)
    shutil.copy2(out, restored / SQLITE_FILE_NAME)
    restored_env = cli_env(restored)
    verified = run_cli("audit", "verify", env=restored_env)
    assert verified.returncode == 0, verified.stderr + verified.stdout
    listed = run_cli("user", "list", "--org", "Praktijk Noord", env=restored_env)
    assert listed.returncode == 0, listed.stderr
    assert EMAIL in listed.stdout


def test_a_backup_never_replaces_a_file_and_reads_nothing_then(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = cli_env(data_dir)
    _practice(env)
    out = tmp_path / "notes.txt"
    out.write_text("the practice's own notes")

    done = run_cli("db", "backup", str(out), env=env)

    assert done.returncode == 1
    assert_one_clear_error(done, str(out), "exists already")
    assert out.read_text() == "the practice's own notes"
    with sqlite3.connect(data_dir / SQLITE_FILE_NAME) as db:
        assert db.execute(
            "SELECT count(*) FROM access_log WHERE action LIKE 'database.backup%'"
        ).fetchone() == (0,)


def test_a_backup_into_a_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = cli_env(data_dir)
    _practice(env)
    out = tmp_path / "no-such-dir" / "backup.db"

    done = run_cli("db", "backup", str(out), env=env)

    assert done.returncode == 1
    assert_one_clear_error(done, "cannot be created", "nothing was written")
    assert not out.exists()
    with sqlite3.connect(data_dir / SQLITE_FILE_NAME) as db:
        assert db.execute(
            "SELECT action FROM access_log WHERE action LIKE 'database.backup%' ORDER BY id"
        ).fetchall() == [("database.backup",), ("database.backup.failed",)]


@pytest.fixture
async def postgres_pair() -> AsyncIterator[list[str]]:
    """Two empty PostgreSQL databases: the server's and the one restored into."""
    problem = await postgres_problem()
    if problem:
        service_unavailable("PostgreSQL", problem)
    if shutil.which("pg_dump") is None or shutil.which("pg_restore") is None:
        service_unavailable("PostgreSQL's client tools", "pg_dump or pg_restore is not installed")
    urls = [await create_database(POSTGRES_ADMIN_URL), await create_database(POSTGRES_ADMIN_URL)]
    yield urls
    for url in urls:
        await drop_database(POSTGRES_ADMIN_URL, url)


async def test_a_postgresql_backup_leaves_the_technical_log_out_and_restores_with_pg_restore(
    tmp_path: Path, postgres_pair: list[str]
) -> None:
    url, restored_url = postgres_pair
    env = cli_env(tmp_path / "data", database_url=url)
    _practice(env)
    db = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await db.executemany(
            "INSERT INTO technical_log (at, kind, subject, detail) "
            "VALUES (now(), 'ice.failed', NULL, $1::json)",
            [(f'{{"client_address": "{ADDRESS}"}}',)] * ENTRIES,
        )
    finally:
        await db.close()

    out = tmp_path / "backup.dump"
    done = run_cli("db", "backup", str(out), env=env)

    assert done.returncode == 0, done.stderr
    assert "pg_dump custom format" in done.stdout
    assert _private(out)
    script = (await _run("pg_restore", "--file=-", str(out))).stdout
    assert "COPY public.accounts" in script
    assert EMAIL in script
    assert ADDRESS not in script

    target = asyncpg_dsn(restored_url)
    await _run("pg_restore", "--no-owner", "--exit-on-error", f"--dbname={target}", str(out))
    restored_env = cli_env(tmp_path / "data", database_url=restored_url)
    verified = run_cli("audit", "verify", env=restored_env)
    assert verified.returncode == 0, verified.stderr + verified.stdout
    copy = await asyncpg.connect(asyncpg_dsn(restored_url))
    try:
        assert await copy.fetchval("SELECT count(*) FROM technical_log") == 0
        assert await copy.fetchval("SELECT email FROM accounts") == EMAIL
        assert await copy.fetch(
            "SELECT object_id FROM access_log WHERE action = 'database.backup'"
        ) == [(_backup_id(done.stdout),)]
    finally:
        await copy.close()


async def test_a_postgresql_backup_without_pg_dump_says_what_to_install(
    tmp_path: Path, postgres_pair: list[str]
) -> None:
    url, _ = postgres_pair
    env = cli_env(tmp_path / "data", database_url=url)
    _practice(env)
    # A PATH with the venv's own scripts only: no pg_dump on it.
    env["PATH"] = str(Path(sys.executable).parent)
    out = tmp_path / "backup.dump"

    done = run_cli("db", "backup", str(out), env=env)

    assert done.returncode == 1
    assert_one_clear_error(done, "pg_dump is not installed", "postgresql-client")
    assert not out.exists()


def test_pg_dump_gets_the_url_in_its_environment_over_the_operators_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The URL's parts go to pg_dump in libpq's variables (the password in
    PGPASSWORD: its command line takes only the options and the file, see
    audit/backup.py), over an old PGPASSWORD; the operator's own libpq
    settings (a CA file) stay; asyncpg's ``ssl=true`` becomes a mode libpq
    knows."""
    monkeypatch.setenv("PGSSLROOTCERT", "/etc/ssl/praktijk-ca.pem")
    monkeypatch.setenv("PGPASSWORD", "an old one")
    environ = pg_environment(
        make_url("postgresql+asyncpg://vc:s3cret@db.praktijk.example:6543/videoconsult?ssl=true")
    )
    assert environ["PGHOST"] == "db.praktijk.example"
    assert environ["PGPORT"] == "6543"
    assert environ["PGUSER"] == "vc"
    assert environ["PGPASSWORD"] == "s3cret"
    assert environ["PGDATABASE"] == "videoconsult"
    assert environ["PGSSLMODE"] == "require"
    assert environ["PGSSLROOTCERT"] == "/etc/ssl/praktijk-ca.pem"
