"""Running the ``videoconsult`` command line of this venv in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
