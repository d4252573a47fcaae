"""The command line, run as a user runs it: as a separate process."""

from __future__ import annotations

import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit import head_revision
from audit.db import SQLITE_FILE_NAME
from tests.support.cli import (
    EXECUTABLE,
    assert_one_clear_error,
    cli_env,
    run_cli,
    sqlite_write_lock_held,
    wait_for_line,
)

# Every test here runs the command line in a process of its own (about a second each).
pytestmark = pytest.mark.slow


def test_help_lists_every_command(data_dir: Path) -> None:
    result = run_cli("--help", env=cli_env(data_dir))
    assert result.returncode == 0
    for command in ("serve", "db"):
        assert command in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--help"], "--port"),
        (["db", "--help"], "upgrade"),
        (["db", "upgrade", "--help"], "one transaction"),
        (["db", "current", "--help"], "revision"),
    ],
)
def test_every_command_has_help(data_dir: Path, args: list[str], expected: str) -> None:
    result = run_cli(*args, env=cli_env(data_dir))
    assert result.returncode == 0
    assert expected in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--bogus"], "unrecognized arguments: --bogus"),
        (["serve", "--port", "99999"], "99999 is not between 1 and 65535"),
        (["serve", "--port", "http"], "'http' is not a port number"),
        (["fly"], "invalid choice: 'fly'"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_usage_ends_with_one_message_and_exit_2(
    data_dir: Path, args: list[str], expected: str
) -> None:
    result = run_cli(*args, env=cli_env(data_dir))
    assert result.returncode == 2
    assert_one_clear_error(result, expected)


def test_bad_setting_ends_with_one_line_naming_it(data_dir: Path) -> None:
    result = run_cli("db", "upgrade", env=cli_env(data_dir, server_port="seventy"))
    assert result.returncode == 2
    assert_one_clear_error(result, "server.port", "VIDEOCONSULT_SERVER_PORT", "valid integer")


def test_production_without_master_key_refuses_to_start(data_dir: Path) -> None:
    result = run_cli("serve", env=cli_env(data_dir, mode="production"))
    assert result.returncode == 2
    assert_one_clear_error(result, "production mode needs a master key")
    assert not data_dir.exists()


def test_db_upgrade_then_current_report_the_newest_revision(
    data_dir: Path, empty_database_url: str
) -> None:
    env = cli_env(data_dir, database_url=empty_database_url)
    upgrade = run_cli("db", "upgrade", env=env)
    assert upgrade.returncode == 0, upgrade.stderr
    assert f"revision {head_revision()} (up to date)" in upgrade.stdout
    current = run_cli("db", "current", env=env)
    assert current.returncode == 0
    assert f"revision {head_revision()} (up to date)" in current.stdout


def test_unreachable_database_fails_cleanly_and_creates_nothing(
    data_dir: Path, free_port: int
) -> None:
    url = f"postgresql+asyncpg://vc:hidden-pw@127.0.0.1:{free_port}/vc"
    result = run_cli("db", "upgrade", env=cli_env(data_dir, database_url=url))
    assert result.returncode == 1
    assert_one_clear_error(result, "cannot reach the database", str(free_port))
    assert "hidden-pw" not in result.stderr
    assert [p.name for p in data_dir.iterdir()] == []


def test_data_directory_that_cannot_be_created_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli("db", "upgrade", env=cli_env(blocker / "data"))
    assert result.returncode == 1
    assert_one_clear_error(result, "cannot create data directory", str(blocker / "data"))


def test_data_directory_that_is_a_file_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli("serve", env=cli_env(blocker))
    assert result.returncode == 1
    assert_one_clear_error(result, "exists but is not a directory")


def test_serve_answers_healthz_within_seconds_and_stops_on_sigterm(
    data_dir: Path, free_port: int
) -> None:
    assert EXECUTABLE
    started = time.monotonic()
    with subprocess.Popen(
        [EXECUTABLE, "serve", "--port", str(free_port)],
        env=cli_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            output = wait_for_line(process, "videoconsult is running", timeout_s=20)
            assert f"open http://127.0.0.1:{free_port}/" in output
            assert "DEVELOPMENT MASTER KEY" in output
            url = f"http://127.0.0.1:{free_port}/healthz"
            with urllib.request.urlopen(url, timeout=5) as answer:
                assert answer.status == 200
            assert time.monotonic() - started < 15
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
        assert process.stdout is not None
        rest = process.stdout.read()
    assert "Traceback" not in output + rest
    assert "route=/healthz" in rest


def test_serve_on_a_port_in_use_fails_cleanly(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port), env=cli_env(data_dir))
    assert result.returncode == 1
    assert_one_clear_error(result, f"port {port} on 127.0.0.1 is already in use")


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody may write in, root included (the immutable attribute)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(locked)], check=False).returncode:
        pytest.skip("chattr +i is not available here to make a directory unwritable for root")
    try:
        yield locked
    finally:
        subprocess.run([chattr, "-i", str(locked)], check=True)


def test_data_directory_that_cannot_be_written_fails_cleanly(unwritable_dir: Path) -> None:
    result = run_cli("db", "upgrade", env=cli_env(unwritable_dir))
    assert result.returncode == 1
    assert_one_clear_error(result, str(unwritable_dir))
    assert "not permitted" in result.stderr or "not readable and writable" in result.stderr
    assert list(unwritable_dir.iterdir()) == []


def test_db_current_on_a_fresh_data_directory_creates_no_database(data_dir: Path) -> None:
    result = run_cli("db", "current", env=cli_env(data_dir))
    assert result.returncode == 0
    assert "none yet" in result.stdout
    assert not data_dir.exists()  # nor the directory (found in review)


def test_files_the_server_creates_are_private(data_dir: Path) -> None:
    result = run_cli("db", "upgrade", env=cli_env(data_dir))
    assert result.returncode == 0
    database = data_dir / "videoconsult.db"
    assert database.stat().st_mode & 0o077 == 0


def test_failed_migration_error_is_one_short_line(data_dir: Path) -> None:
    import sqlite3

    data_dir.mkdir(mode=0o700)
    with sqlite3.connect(data_dir / "videoconsult.db") as conn:
        conn.execute("CREATE TABLE organisations (id INTEGER)")
    result = run_cli("db", "upgrade", env=cli_env(data_dir))
    assert result.returncode == 1
    assert_one_clear_error(result, "schema migration failed and was rolled back")
    assert "[SQL:" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ctrl_c_while_waiting_for_the_database_stops_at_once(data_dir: Path) -> None:
    # A server that accepts TCP connections and never answers: the driver
    # would wait for its whole connect timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        env = cli_env(
            data_dir,
            database_url=f"postgresql+asyncpg://vc@127.0.0.1:{port}/vc",
            database_connect_timeout_s="30",
        )
        assert EXECUTABLE
        with subprocess.Popen(
            [EXECUTABLE, "db", "upgrade"], env=env, stderr=subprocess.PIPE, text=True
        ) as process:
            # Started and waiting for the database: its connection came in
            # (on a busy machine the start alone can take seconds).
            silent.settimeout(30)
            waiting, _address = silent.accept()
            started = time.monotonic()
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 130
            assert time.monotonic() - started < 5
            assert process.stderr is not None
            assert "interrupted; the database is unchanged" in process.stderr.read()
            waiting.close()


def test_operator_adds_an_organisation_and_an_account_with_an_enrolment_link(
    data_dir: Path,
) -> None:
    env = cli_env(data_dir, server_public_url="https://video.praktijk-noord.example")
    assert run_cli("db", "upgrade", env=env).returncode == 0
    added = run_cli("org", "add", "Praktijk Noord", env=env)
    assert added.returncode == 0, added.stderr
    again = run_cli("org", "add", "Praktijk Noord", env=env)
    assert_one_clear_error(again, "exists already")
    # Found in review: a control character was taken, and printed by org list.
    control = run_cli("org", "add", "Praktijk\x01Zuid", env=env)
    assert_one_clear_error(control, "control characters (U+0001)")

    user = run_cli(
        "user",
        "add",
        "--org",
        "Praktijk Noord",
        "--role",
        "admin",
        "--email",
        "Ad@Noord.example",
        env=env,
    )
    assert user.returncode == 0, user.stderr
    assert "https://video.praktijk-noord.example/enrol/" in user.stdout
    listing = run_cli("user", "list", "--org", "Praktijk Noord", env=env)
    assert "admin      enrolling  ad@noord.example" in listing.stdout

    reset = run_cli("user", "reset-totp", "ad@noord.example", env=env)
    assert "/enrol/" in reset.stdout
    disabled = run_cli("user", "disable", "ad@noord.example", env=env)
    assert "is now disabled" in disabled.stdout
    role = run_cli("user", "set-role", "ad@noord.example", "support", env=env)
    assert "now has the role support" in role.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["user", "add", "--org", "Nope", "--role", "admin", "--email", "a@b.nl"], "no organis"),
        (["user", "add", "--org", "X", "--role", "king", "--email", "a@b.nl"], "invalid choice"),
        (["user", "disable", "nobody@example.nl"], "no account with the e-mail address"),
        (["user", "disable", "\u0430nna@example.nl"], "U+0430"),
        (
            ["billing", "export", "--org", "X", "--month", "2026-11", "--tz", "Europe/Amsterdamm"],
            "--tz 'Europe/Amsterdamm' is not a time zone",
        ),
        # A folder of the time zone database (found in review: a traceback).
        (
            ["billing", "export", "--org", "X", "--month", "2026-11", "--tz", "Europe"],
            "--tz 'Europe' is not a time zone",
        ),
        (
            ["billing", "export", "--org", "X", "--month", "2026-11", "--format", "xlsx"],
            "argument --format: invalid choice: 'xlsx' (choose from 'csv', 'excel', 'json')",
        ),
    ],
)
def test_user_commands_refuse_bad_input_with_one_line(
    data_dir: Path, args: list[str], expected: str
) -> None:
    env = cli_env(data_dir)
    assert run_cli("db", "upgrade", env=env).returncode == 0
    result = run_cli(*args, env=env)
    assert_one_clear_error(result, expected)


def test_user_commands_need_an_up_to_date_schema(data_dir: Path) -> None:
    result = run_cli("org", "list", env=cli_env(data_dir))
    assert_one_clear_error(result, "run `videoconsult db upgrade`")
    assert not data_dir.exists()  # looking creates no data directory


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["billing", "export", "--org", "Praktijk Noord", "--month", "2026-11"], "consult_id"),
        (["user", "list", "--org", "Praktijk Noord"], "ad@noord.example"),
        (["recording", "list", "--org", "Praktijk Noord"], ""),
    ],
)
def test_a_read_prints_nothing_unless_its_access_record_is_written(
    data_dir: Path, args: list[str], shown: str
) -> None:
    """The command reads without SQLite's write lock, then writes its record
    in a short transaction of its own, and prints only once that committed:
    while another connection holds the lock past the command's wait, it
    fails and shows nothing."""
    env = cli_env(data_dir, database_connect_timeout_s="1")
    assert run_cli("db", "upgrade", env=env).returncode == 0
    assert run_cli("org", "add", "Praktijk Noord", env=env).returncode == 0
    added = run_cli(
        "user",
        "add",
        "--org",
        "Praktijk Noord",
        "--role",
        "admin",
        "--email",
        "ad@noord.example",
        env=env,
    )
    assert added.returncode == 0, added.stderr
    with sqlite_write_lock_held(data_dir) as holder:
        refused = run_cli(*args, env=env)
        recorded = holder.execute("SELECT count(*) FROM access_log").fetchone()[0]
    assert refused.returncode != 0
    assert refused.stdout == ""
    answered = run_cli(*args, env=env)
    assert answered.returncode == 0, answered.stderr
    assert shown in answered.stdout
    with sqlite3.connect(data_dir / SQLITE_FILE_NAME) as reader:
        assert reader.execute("SELECT count(*) FROM access_log").fetchone()[0] == recorded + 1


@pytest.mark.parametrize(
    "args",
    [
        ["org", "add", "Praktijk Zuid"],
        ["user", "list", "--org", "Praktijk Noord"],
        ["retention", "run"],
    ],
)
def test_a_database_locked_by_another_process_is_one_line_not_a_traceback(
    data_dir: Path, args: list[str]
) -> None:
    """While another process holds SQLite's write lock past the command's
    wait, the command fails with one line that says so, names the setting
    that sets the wait, and shows no SQL."""
    env = cli_env(data_dir, database_connect_timeout_s="1")
    assert run_cli("db", "upgrade", env=env).returncode == 0
    assert run_cli("org", "add", "Praktijk Noord", env=env).returncode == 0
    with sqlite_write_lock_held(data_dir):
        refused = run_cli(*args, env=env)
    assert_one_clear_error(refused, "database is busy", "database.connect_timeout_s")
    assert "SQL" not in refused.stderr
    assert run_cli(*args, env=env).returncode == 0
