"""A PostgreSQL server of a test's own, for drills that restart it: ``initdb``
into a fresh directory, ``pg_ctl start`` on a free port of 127.0.0.1 with
trust authentication, stopped and deleted afterwards. The shared server the
other tests use (``services.POSTGRES_ADMIN_URL``) is never touched.

The programs are Debian's (``/usr/lib/postgresql/<version>/bin``, the newest),
else ``initdb`` and ``pg_ctl`` on the PATH. PostgreSQL refuses to run as
root: as root, both run as the ``postgres`` user (``runuser``), and the
directory is that user's.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.ports import unused_port
from tests.support.services import service_unavailable

# The user PostgreSQL runs as when the tests run as root (Debian's).
POSTGRES_USER = "postgres"
PROGRAMS = "PostgreSQL's programs (initdb, pg_ctl)"


def _version(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


def postgres_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are, or None."""
    debian = sorted(
        (path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")),
        key=_version,
        reverse=True,
    )
    for bindir in debian:
        if (bindir / "initdb").exists():
            return bindir
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(pg_ctl).parent
    return None


class OwnPostgres:
    """One PostgreSQL cluster in a temporary directory; ``url`` reaches its
    ``postgres`` database as the ``postgres`` superuser (no password)."""

    def __init__(self, bindir: Path, directory: Path, *, as_user: str | None) -> None:
        self._bindir = bindir
        self.directory = directory
        self.data = directory / "data"
        self.log = directory / "postgres.log"
        self.port = unused_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"
        self._prefix = ["runuser", "-u", as_user, "--"] if as_user else []

    def _run(self, program: str, *args: str, timeout_s: float = 60) -> None:
        command = [*self._prefix, str(self._bindir / program), *args]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise AssertionError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{log[-3000:]}"
            )

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", *args)

    def initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )

    def start(self) -> None:
        # The socket in the directory too: never in /var/run/postgresql,
        # where the shared server's is.
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        self._pg_ctl("-o", options, "start")

    def restart(self, mode: str = "fast") -> None:
        """Stop (``fast``: sessions cut, a clean shutdown; ``immediate``: no
        shutdown at all, crash recovery at the start) and start again, on
        the same port: ``pg_ctl`` remembers the options."""
        self._pg_ctl("-m", mode, "restart")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "stop")


@contextlib.contextmanager
def own_postgres_server() -> Iterator[OwnPostgres]:
    """A started :class:`OwnPostgres`; skipped (failed under CI=true) when the
    programs are missing or PostgreSQL cannot run here."""
    bindir = postgres_bindir()
    if bindir is None:
        service_unavailable(
            PROGRAMS,
            "they are not installed (Debian: the postgresql package)",
        )
    as_user = None
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(POSTGRES_USER)
        except KeyError:
            service_unavailable(
                PROGRAMS,
                f"the tests run as root and there is no {POSTGRES_USER!r} user to run them as",
            )
        if shutil.which("runuser") is None:
            service_unavailable(PROGRAMS, "runuser is not installed")
        as_user = POSTGRES_USER
    # In /tmp, not in pytest's tmp_path: that is the test user's alone, and
    # the postgres user must reach its directory.
    directory = Path(tempfile.mkdtemp(prefix="videoconsult-pg-"))
    try:
        if owner is not None:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        server = OwnPostgres(bindir, directory, as_user=as_user)
        server.initdb()
        server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                server.stop("immediate")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
