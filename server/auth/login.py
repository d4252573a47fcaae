"""Logging in: password and TOTP code on every login, with lockouts.

Whatever goes wrong (unknown address, wrong password, wrong or replayed
code, account not enrolled or disabled) the caller learns only "refused",
and every path verifies one argon2 hash, so timing tells nothing either.
Failures are counted per e-mail address and per client address under keyed
hashes, so an unknown address locks exactly like a known one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from structlog.typing import FilteringBoundLogger

from audit.accounts import (
    Account,
    AccountStatus,
    claim_totp_step,
    find_account_by_email,
    normalise_email,
    update_password_hash,
)
from audit.clock import Clock
from audit.db import reading
from audit.errors import InvalidValue
from audit.keys import MasterKey
from audit.sealing import keyed_hash, unseal
from audit.sessions import forget_login_attempt, login_failures_before, record_login_attempt
from config import AccountSettings
from server.auth import totp
from server.auth.errors import LoginLocked, LoginRefused
from server.auth.lockout import locked_until, lookback
from server.auth.passwords import PasswordHasher

TOTP_PURPOSE = "totp-secret"


def login_subject_hash(master_key: bytes, email: str) -> str:
    """The keyed hash failed logins at ``email`` (the stored form) are counted
    under: the lockout counts by it, the export and the erasure find them by it."""
    return keyed_hash(master_key, "login-subject", email)


@dataclass(frozen=True)
class LoginAttempt:
    email: str
    password: str
    code: str
    # The client's address: counted under a keyed hash, kept only in the
    # 24-hour technical log.
    client_address: str


@dataclass(frozen=True)
class Authenticator:
    engine: AsyncEngine
    clock: Clock
    master_key: MasterKey
    hasher: PasswordHasher
    settings: AccountSettings
    # The technical log's sink (audit.technical_log.TechnicalLog.log): its
    # entries keep to the table's most rows, as every other entry does.
    technical: FilteringBoundLogger

    async def login(self, attempt: LoginAttempt) -> Account:
        """Return the account if password and code are right; raise otherwise."""
        now = self.clock.now()
        try:
            email = normalise_email(attempt.email)
        except InvalidValue:
            email = attempt.email.strip().lower()
        attempt_id = await self._attempt(email, attempt.client_address, now)
        async with reading(self.engine) as conn:
            account = await find_account_by_email(conn, email)

        password_ok = await self.hasher.verify(
            account.password_hash if account else None, attempt.password
        )
        reason = self._reason(account, password_ok)
        step = None
        if reason is None and account is not None and account.totp_secret_sealed is not None:
            secret = unseal(
                self.master_key.key,
                TOTP_PURPOSE,
                account.totp_secret_sealed,
                bound_to=str(account.id),
            ).decode()
            step = totp.matching_step(secret, attempt.code, now=now)
            reason = "wrong code" if step is None else None

        if reason is None and account is not None and step is not None:
            async with self.engine.begin() as conn:
                if await claim_totp_step(conn, account.id, step):
                    await forget_login_attempt(conn, attempt_id)
                    if account.password_hash and self.hasher.needs_rehash(account.password_hash):
                        new_hash = await self.hasher.hash(attempt.password)
                        await update_password_hash(conn, account.id, new_hash)
                    return account
            reason = "replayed code"
        self.technical.info(
            "login.failed",
            subject=str(account.id) if account else None,
            reason=reason,
            client_address=attempt.client_address,
        )
        raise LoginRefused

    async def check_password(self, account: Account, password: str, client_address: str) -> bool:
        """Whether ``password`` is the account's, counted like a login's password:
        a wrong one is a failure towards the same lockouts, and while locked
        nothing is checked (raises :class:`LoginLocked`)."""
        now = self.clock.now()
        attempt_id = await self._attempt(account.email, client_address, now)
        if await self.hasher.verify(account.password_hash, password):
            async with self.engine.begin() as conn:
                await forget_login_attempt(conn, attempt_id)
            return True
        self.technical.info(
            "password.failed", subject=str(account.id), client_address=client_address
        )
        return False

    async def _attempt(self, email: str, client_address: str, now: datetime) -> int:
        """Record an attempt at ``email``'s password; raise :class:`LoginLocked`
        (the attempt forgotten) while failures lock the address or the client."""
        subject_hash = login_subject_hash(self.master_key.key, email)
        client_hash = keyed_hash(self.master_key.key, "login-client", client_address)
        # The attempt counts as a failure from the start, committed before any
        # check, so that parallel attempts see each other; success forgives it.
        async with self.engine.begin() as conn:
            attempt_id = await record_login_attempt(
                conn, subject_hash=subject_hash, client_hash=client_hash, now=now
            )
        async with self.engine.begin() as conn:
            until = await self._locked_until(conn, attempt_id, subject_hash, client_hash, now)
            if until is None:
                return attempt_id
            # Refused unchecked: it must not stretch the lock.
            await forget_login_attempt(conn, attempt_id)
        # Named by the account it was for, where there is one (as login.failed
        # is): an account holder's export holds it, and an erasure takes it.
        async with reading(self.engine) as conn:
            account = await find_account_by_email(conn, email)
        self.technical.info(
            "login.locked",
            subject=None if account is None else str(account.id),
            client_address=client_address,
            until=until.isoformat(),
        )
        raise LoginLocked((until - now).total_seconds())

    @staticmethod
    def _reason(account: Account | None, password_ok: bool) -> str | None:
        if account is None:
            return "unknown account"
        if not password_ok:
            return "wrong password"
        if account.status is AccountStatus.DISABLED:
            return "account disabled"
        if account.status is AccountStatus.ENROLLING:
            return "not enrolled"
        return None

    async def _locked_until(
        self,
        conn: AsyncConnection,
        attempt_id: int,
        subject_hash: str,
        client_hash: str,
        now: datetime,
    ) -> datetime | None:
        """Until when the failures recorded before this attempt lock it out, or None."""
        since = now - lookback(
            window_s=self.settings.failure_window_s, lockout_s=self.settings.lockout_s
        )
        by_subject = await login_failures_before(conn, attempt_id, since, subject_hash=subject_hash)
        by_client = await login_failures_before(conn, attempt_id, since, client_hash=client_hash)
        locks = [
            locked_until(
                by_subject,
                now=now,
                max_failures=self.settings.max_failures,
                window_s=self.settings.failure_window_s,
                lockout_s=self.settings.lockout_s,
            ),
            locked_until(
                by_client,
                now=now,
                max_failures=self.settings.client_max_failures,
                window_s=self.settings.failure_window_s,
                lockout_s=self.settings.lockout_s,
            ),
        ]
        return max((lock for lock in locks if lock is not None), default=None)
