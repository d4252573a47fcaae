"""The authentication services, built from what the application holds."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.typing import FilteringBoundLogger

from audit.clock import Clock
from audit.keys import MasterKey
from config import AccountSettings
from server.app_keys import (
    CLOCK,
    DB_ENGINE,
    MASTER_KEY,
    PASSWORD_HASHER,
    SETTINGS,
    TECHNICAL_LOG,
)
from server.auth.enrolment import Enroller
from server.auth.login import Authenticator
from server.auth.passwords import PasswordHasher


def authenticator(app: web.Application) -> Authenticator:
    return Authenticator(*_parts(app))


def enroller(app: web.Application) -> Enroller:
    return Enroller(*_parts(app))


def _parts(
    app: web.Application,
) -> tuple[AsyncEngine, Clock, MasterKey, PasswordHasher, AccountSettings, FilteringBoundLogger]:
    """What both services are made of, in their fields' order."""
    return (
        app[DB_ENGINE],
        app[CLOCK],
        app[MASTER_KEY],
        app[PASSWORD_HASHER],
        app[SETTINGS].accounts,
        app[TECHNICAL_LOG].log,
    )
