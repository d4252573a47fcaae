"""Prepare the data directory that the embedded defaults keep their files in."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import structlog

from audit.errors import DataDirError

_log = structlog.get_logger("videoconsult.datadir")


def prepare_data_dir(path: Path) -> Path:
    """Create ``path`` if needed and check that this process may use it.

    Returns the absolute path. Raises :class:`DataDirError` naming the path
    and the reason when it is not a directory, cannot be created, or is not
    readable and writable.
    """
    path = path.expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise DataDirError(f"data directory {path} exists but is not a directory")
    try:
        # 0o700: the database, keys and recordings are for this service alone.
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise DataDirError(f"cannot create data directory {path}: {err.strerror}") from None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Database, keys and recordings are for this service alone.
        try:
            path.chmod(0o700)
        except OSError as err:
            raise DataDirError(
                f"data directory {path} is open to other users (mode {mode:o}) and "
                f"cannot be made private: {err.strerror}"
            ) from None
        _log.warning("made the data directory private (mode 700)", previous_mode=f"{mode:o}")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise DataDirError(f"data directory {path} is not readable and writable by this user")
    try:
        # os.access trusts the mode bits; a read-only mount only shows on a write.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise DataDirError(f"cannot write in data directory {path}: {err.strerror}") from None
    return path
