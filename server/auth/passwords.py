"""Password policy and argon2id hashing (argon2-cffi), off the event loop."""

from __future__ import annotations

import asyncio
import secrets

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from config import AccountSettings
from server.auth.errors import PasswordPolicyError

# Long enough for any passphrase; short enough that hashing stays cheap.
MAX_PASSWORD_LENGTH = 1024


def check_password_policy(password: str, *, min_length: int) -> None:
    """Raise :class:`PasswordPolicyError` unless ``password`` is acceptable."""
    if len(password) < min_length:
        raise PasswordPolicyError(f"the password needs at least {min_length} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise PasswordPolicyError(f"the password may have at most {MAX_PASSWORD_LENGTH} characters")
    if not password.strip():
        raise PasswordPolicyError("the password must not be only spaces")
    if len(set(password)) < 4:
        raise PasswordPolicyError("the password needs at least 4 different characters")


class PasswordHasher:
    """argon2id with the configured costs. Hashing runs in a worker thread:
    at the default costs it takes tens of milliseconds of CPU."""

    def __init__(self, settings: AccountSettings) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            type=argon2.Type.ID,
        )
        # Verified when the account does not exist, so that an unknown
        # address costs as much time as a wrong password.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Say whether ``password`` matches; with no stored hash, spend the same time."""
        return await asyncio.to_thread(self._verify, stored_hash, password)

    def _verify(self, stored_hash: str | None, password: str) -> bool:
        try:
            self._hasher.verify(stored_hash or self._dummy_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        return self._hasher.check_needs_rehash(stored_hash)
