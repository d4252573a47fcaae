"""A ``videoconsult serve`` in a process of its own, and a professional's
session cookie to reach it with."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.cli import EXECUTABLE, cli_env
from tests.support.harness import Harness
from tests.support.settings import CHEAP_PASSWORD_HASHING


class ServerProcess:
    """``videoconsult serve`` on the harness's data directory."""

    def __init__(
        self, data_dir: Path, port: int, log: Path, settings: dict[str, str] | None = None
    ) -> None:
        """``settings``: more settings by their environment name without the prefix."""
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"
        assert EXECUTABLE
        cheap = {
            name.removeprefix("VIDEOCONSULT_").lower(): value
            for name, value in CHEAP_PASSWORD_HASHING.items()
        }
        env = cli_env(data_dir, **cheap, **(settings or {}))
        self._log = log.open("a")
        self.process = subprocess.Popen(
            [EXECUTABLE, "serve", "--port", str(port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_healthy(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}")
            url = f"{self.origin}/healthz"  # always http://127.0.0.1
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:  # noqa: S310
                if answer.status == 200:
                    return
            time.sleep(0.2)
        pytest.fail(f"the server did not answer /healthz within {timeout_s} s")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if not self._log.closed:
            self._log.close()


def session_cookie(harness: Harness) -> str:
    for cookie in harness.client.session.cookie_jar:
        if cookie.key == "vc_session":
            return cookie.value
    raise AssertionError("the harness is not logged in")
