"""Enrolment: from a one-time link to a password and a confirmed TOTP app.

Step one sets the password and makes a TOTP secret, shown this once as a
QR code; step two takes one valid code from the app, and only then does the
account become active. Until then the chosen password and secret wait with
the link, sealed, and the account cannot log in.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.typing import FilteringBoundLogger

from audit.accounts import (
    Account,
    EnrolmentLink,
    complete_enrolment,
    open_enrolment_link,
    set_enrolment_pending,
)
from audit.clock import Clock
from audit.db import reading
from audit.errors import Conflict, InvalidValue
from audit.keys import MasterKey
from audit.sealing import seal, unseal
from config import AccountSettings
from server.auth import totp
from server.auth.errors import PasswordPolicyError
from server.auth.login import TOTP_PURPOSE, Authenticator
from server.auth.passwords import PasswordHasher, check_password_policy


@dataclass(frozen=True)
class TotpSetup:
    """What the new user's authenticator app needs; shown once, never again."""

    secret: str
    provisioning_uri: str
    qr_code: str


@dataclass(frozen=True)
class Enroller:
    engine: AsyncEngine
    clock: Clock
    master_key: MasterKey
    hasher: PasswordHasher
    settings: AccountSettings
    technical: FilteringBoundLogger  # the technical log's sink (see Authenticator)

    async def open(self, token: str) -> EnrolmentLink:
        async with reading(self.engine) as conn:
            return await open_enrolment_link(conn, token, now=self.clock.now())

    async def choose_password(self, token: str, password: str, *, client_address: str) -> TotpSetup:
        """Check and keep the password, make a TOTP secret; raise InvalidValue on policy.

        After a TOTP reset the account keeps its password: the link asks for
        it, so that whoever was handed the link (the admin who reset it) cannot
        take the account over. A wrong one counts as a failed login
        (:class:`~server.auth.errors.LoginLocked` once locked out).
        """
        link = await self.open(token)
        if link.account.password_hash is not None:
            login = Authenticator(
                self.engine,
                self.clock,
                self.master_key,
                self.hasher,
                self.settings,
                self.technical,
            )
            if not await login.check_password(link.account, password, client_address):
                raise InvalidValue(
                    "this is not the account's current password: a reset of the "
                    "authenticator app keeps the password, enter it to go on"
                )
            password_hash = link.account.password_hash
        else:
            try:
                check_password_policy(password, min_length=self.settings.password_min_length)
            except PasswordPolicyError as err:
                raise InvalidValue(str(err)) from None
            password_hash = await self.hasher.hash(password)
        secret = totp.new_secret()
        sealed = seal(
            self.master_key.key, TOTP_PURPOSE, secret.encode(), bound_to=str(link.account.id)
        )
        async with self.engine.begin() as conn:
            link = await open_enrolment_link(conn, token, now=self.clock.now())
            await set_enrolment_pending(
                conn, link, password_hash=password_hash, totp_secret_sealed=sealed
            )
        uri = totp.provisioning_uri(secret, link.account.email)
        return TotpSetup(secret, uri, totp.qr_code_svg_data_uri(uri))

    async def confirm(self, token: str, code: str) -> Account:
        """Activate the account if ``code`` comes from the new secret."""
        now = self.clock.now()
        async with self.engine.begin() as conn:
            link = await open_enrolment_link(conn, token, now=now)
            if link.pending_totp_secret_sealed is None:
                raise Conflict("choose a password first; then confirm a code from the app")
            secret = unseal(
                self.master_key.key,
                TOTP_PURPOSE,
                link.pending_totp_secret_sealed,
                bound_to=str(link.account.id),
            ).decode()
            step = totp.matching_step(secret, code, now=now)
            if step is None:
                raise InvalidValue(
                    "the code does not match; enter the current code from the app "
                    "(and check that the phone's clock is right)"
                )
            return await complete_enrolment(conn, link, totp_step=step, now=now)
