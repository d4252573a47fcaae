"""The command line on a new clinic's first day: links point where the server
really is, and the data directory does not follow the working directory."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import EXECUTABLE, assert_one_clear_error, cli_env, run_cli, wait_for_line

pytestmark = pytest.mark.slow


def test_an_enrolment_link_follows_the_port_serve_listens_on(
    data_dir: Path, free_port: int
) -> None:
    env = cli_env(data_dir)
    assert EXECUTABLE
    with subprocess.Popen(
        [EXECUTABLE, "serve", "--port", str(free_port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            wait_for_line(process, "videoconsult is running", timeout_s=30)
            assert run_cli("org", "add", "Praktijk Noord", env=env).returncode == 0
            added = run_cli(
                "user", "add", "--org", "Praktijk Noord", "--role", "admin",
                "--email", "ad@noord.example", env=env,
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
            assert f"  http://127.0.0.1:{free_port}/enrol/" in added.stdout
            assert "server.public_url" in added.stdout  # says where the link comes from
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
    # With the server stopped, the link says it assumes the configured port.
    again = run_cli("user", "reset-totp", "ad@noord.example", env=env)
    assert "http://127.0.0.1:8080/enrol/" in again.stdout
    assert "VIDEOCONSULT_SERVER_PUBLIC_URL" in again.stdout
    # Found in review: never enrolled, the account has no password, so this
    # link sets one; the console said the account kept its password.
    assert "keeps its password" not in again.stdout
    assert "give it to the account holder only" in again.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["user", "list", "--org", "Praktijk Noord"],
        # Found in review: these made a development master key (and db
        # current the directory) before finding no database.
        ["keys", "list"],
        ["keys", "rotate"],
        ["recording", "export", "0b6f3c4e-2d1a-4f5b-8e7c-9a1b2c3d4e5f", "out.webm"],
        ["billing", "export", "--org", "Praktijk Noord", "--month", "2026-11"],
    ],
)
def test_a_command_finding_no_database_names_the_directory_and_creates_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "not-here"
    env = cli_env(missing)
    result = subprocess.run(
        [str(EXECUTABLE), *command],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert_one_clear_error(result, f"no database in {missing}", "VIDEOCONSULT_DATA_DIR")
    assert not missing.exists()
    assert [path.name for path in tmp_path.iterdir()] == []


def test_a_second_serve_refused_its_port_leaves_the_running_ones_address(
    data_dir: Path, free_port: int
) -> None:
    """Found in review: the refused second serve removed serving.json, and
    links then named the configured port instead of the running server's."""
    env = cli_env(data_dir)
    assert EXECUTABLE
    with subprocess.Popen(
        [EXECUTABLE, "serve", "--port", str(free_port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            wait_for_line(process, "videoconsult is running", timeout_s=30)
            serving = data_dir / "serving.json"
            written = serving.read_text()
            second = run_cli("serve", "--port", str(free_port), env=env)
            assert second.returncode != 0
            assert "already in use" in second.stderr
            assert serving.read_text() == written
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
    assert not (data_dir / "serving.json").exists()  # the first one's own, gone with it
