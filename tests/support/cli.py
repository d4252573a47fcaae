"""Running the ``videoconsult`` command line of this venv in a subprocess."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from audit.db import SQLITE_FILE_NAME

EXECUTABLE = shutil.which("videoconsult", path=str(Path(sys.executable).parent))


def cli_env(data_dir: Path, **settings: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VIDEOCONSULT_")}
    environ["VIDEOCONSULT_DATA_DIR"] = str(data_dir)
    for name, value in settings.items():
        environ[f"VIDEOCONSULT_{name.upper()}"] = value
    return environ


def run_cli(
    *args: str, env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    assert EXECUTABLE, "the videoconsult console script is not installed next to this Python"
    return subprocess.run(
        [EXECUTABLE, *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def assert_one_clear_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]


def wait_for_line(process: subprocess.Popen[str], needle: str, timeout_s: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    process.kill()
    pytest.fail(f"{needle!r} not printed within {timeout_s} s; output: {''.join(seen)}")


@contextmanager
def sqlite_write_lock_held(data_dir: Path) -> Iterator[sqlite3.Connection]:
    """Another process's long write: SQLite's write lock on the data
    directory's database, held by a connection of the test's own until the
    block ends (rolled back)."""
    holder = sqlite3.connect(data_dir / SQLITE_FILE_NAME, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield holder
    finally:
        holder.rollback()
        holder.close()
