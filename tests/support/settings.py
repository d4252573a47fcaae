"""The settings factory's type, and the cheap password hashing every test app uses."""

from __future__ import annotations

from collections.abc import Callable

from config import Settings

SettingsFactory = Callable[..., Settings]


# argon2id at its production cost takes ~0.1 s per hash; tests hash a lot.
# test_passwords.py checks the production defaults separately.
CHEAP_PASSWORD_HASHING = {
    "VIDEOCONSULT_ACCOUNTS_ARGON2_TIME_COST": "1",
    "VIDEOCONSULT_ACCOUNTS_ARGON2_MEMORY_KIB": "1024",
    "VIDEOCONSULT_ACCOUNTS_ARGON2_PARALLELISM": "1",
}
