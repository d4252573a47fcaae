"""The master key, which wraps every other key videoconsult keeps.

Production reads it from the settings. Development may leave it empty: then
a random key is generated once into ``data_dir/dev-master-key`` and reused,
and the caller is told so, to warn loudly that this is for development only.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from audit.errors import DataDirError
from config import Settings
from config.settings import MASTER_KEY_BYTES

DEV_MASTER_KEY_FILE = "dev-master-key"


@dataclass(frozen=True, repr=False)
class MasterKey:
    """The key bytes and where they came from; ``repr`` never shows the key."""

    key: bytes
    # Set when the key is a generated development key in this file.
    dev_key_file: Path | None

    def __repr__(self) -> str:
        origin = "settings" if self.dev_key_file is None else str(self.dev_key_file)
        return f"MasterKey(from {origin})"


def load_master_key(settings: Settings, data_dir: Path) -> MasterKey:
    """Return the configured master key, or in development the generated one."""
    configured = settings.security.master_key_bytes()
    if configured is not None:
        return MasterKey(configured, None)
    if settings.is_production:  # pragma: no cover - Settings refuses this already
        raise DataDirError("production mode needs security.master_key")
    path = data_dir / DEV_MASTER_KEY_FILE
    if not path.exists():
        _write_new_key(path)
    try:
        raw = path.read_text(encoding="ascii").strip()
        key = base64.urlsafe_b64decode(raw)
    except (OSError, ValueError) as err:
        raise DataDirError(f"cannot read development master key {path}: {err}") from None
    if len(key) != MASTER_KEY_BYTES:
        raise DataDirError(f"development master key {path} is damaged: delete it to make a new one")
    return MasterKey(key, path)


def _write_new_key(path: Path) -> None:
    encoded = base64.urlsafe_b64encode(secrets.token_bytes(MASTER_KEY_BYTES))
    try:
        # O_EXCL: two processes starting at once must not both write a key.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as err:
        raise DataDirError(f"cannot create development master key {path}: {err.strerror}") from None
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(encoded + b"\n")
