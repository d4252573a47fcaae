"""Bulk work that leaves the machine to signaling: a duty cycle.

A bulk job the server runs for a request (an access-log verify, an export)
or on a schedule (the retention purge) does its work in pieces; after each
piece it rests so that, over the job, it is busy at most ``share`` of the
wall time. "Busy" is the piece's wall time: it includes the database's work
that the piece waited for, which a worker's niceness cannot lower (the
database's processes are not the server's). PostgreSQL's autovacuum gives
way the same way (``autovacuum_vacuum_cost_delay``).

The share is the machine's, not each job's: the jobs paced at once (an
admin's verify and export in the server, a purge by the command line) share
it between them, as autovacuum's workers share one cost limit
(``autovacuum_vacuum_cost_limit``, balanced among the workers at work). Each
registers in a directory of the data dir (:class:`Peers`) and rests for its
part of the share, counted anew after each piece.

Only the standard library: the worker scripts (``chain_walk.py``,
``export_walk.py``) import this file by its path, without the package.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

# The directory of the data dir where the machine's paced jobs register (Peers).
PEERS_DIR = "bulk-jobs"

# The longest rest after one piece: a piece that took long (a slow disk,
# a lock waited for) must not make the job sleep for minutes.
MAX_REST_S = 10.0


def rest_after(busy_s: float, share: float) -> float:
    """How long to rest after ``busy_s`` of work to be busy ``share`` of the time."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be more than 0 and at most 1, not {share!r}")
    return min(MAX_REST_S, max(0.0, busy_s) * (1 - share) / share)


class Peers:
    """The paced jobs at work on this machine: a file each in ``directory``
    (``<pid>-<random>``), which its job holds locked (``flock``) while it
    works. A file nobody holds locked is a job whose process died (the
    kernel let go of its lock): the next count removes it. Locks, unlike
    process ids, mean the same in every PID namespace that shares the
    directory (a server and the command line in containers of their own).
    Raises :class:`OSError` if the directory cannot be used (:class:`Pace`
    then paces the job alone, as before there were peers)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        _make_directory(self.directory)
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        # Locked under a name no count reads, then renamed: a count never
        # sees it unlocked. Readable by all: another user's count (the
        # command line run as root beside the server) opens it to test the lock.
        hidden = self.directory / f".{name}"
        fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._own = self.directory / name
            hidden.rename(self._own)
        except BaseException:
            os.close(fd)
            hidden.unlink(missing_ok=True)
            raise
        self._fd = fd

    def count(self) -> int:
        """How many paced jobs are at work, this one included (1 if the
        directory cannot be read any more)."""
        count = 0
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    own = entry.path == str(self._own)
                    if own or (not entry.name.startswith(".") and _held(entry.path)):
                        count += 1
        except OSError:
            return 1
        return max(1, count)

    def close(self) -> None:
        if self._fd >= 0:
            self._own.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1


def _make_directory(directory: Path) -> None:
    """``directory``, made if need be; made by root (the command line run
    with sudo), given to the owner of the directory it is in (the data
    dir's: the server's user), who could not register in it otherwise."""
    try:
        directory.mkdir(mode=0o755)
    except FileExistsError:
        return
    parent = directory.parent.stat()
    if os.geteuid() == 0 and parent.st_uid != 0:
        os.chown(directory, parent.st_uid, parent.st_gid)


def _held(path: str) -> bool:
    """Whether a job holds ``path`` locked (or it cannot be told: then it
    counts); if none does, remove it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: a job at work
        return True
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)
    return False


class Pace:
    """Call :meth:`rest` between the pieces of a job (in a worker process or
    a thread): it sleeps long enough for the job to be busy at most its part
    of ``share`` since the piece began. ``share`` 1: it never sleeps.

    With ``peers`` (a directory), a paced job's part is ``share`` divided by
    the paced jobs at work (:class:`Peers`); :meth:`close` (or the end of a
    ``with`` block) leaves the directory."""

    def __init__(
        self,
        share: float,
        *,
        peers: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        rest_after(0.0, share)  # validates
        self.share = share
        self._peers: Peers | None = None
        if peers is not None and share < 1:
            # A directory that cannot be used (another user's, a file system
            # without locks) leaves the job paced alone.
            with contextlib.suppress(OSError):
                self._peers = Peers(peers)
        self._clock = clock
        self._sleep = sleep
        self._since = clock()
        self.rested_s = 0.0

    def part(self) -> float:
        """This job's part of the share now."""
        return self.share if self._peers is None else self.share / self._peers.count()

    def due(self) -> float:
        """The rest due after the piece that began at the last rest (or at the start)."""
        return 0.0 if self.share >= 1 else rest_after(self._clock() - self._since, self.part())

    def rested(self) -> None:
        """The next piece begins now (after a rest taken elsewhere, e.g. ``asyncio.sleep``)."""
        self._since = self._clock()

    def rest(self) -> None:
        pause = self.due()
        if pause > 0:
            self._sleep(pause)
            self.rested_s += pause
        self.rested()

    def close(self) -> None:
        if self._peers is not None:
            self._peers.close()

    def __enter__(self) -> Pace:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
