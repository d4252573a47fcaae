"""The authentication services, built from what the application holds."""

from __future__ import annotations

from aiohttp import web

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


def authenticator(app: web.Application) -> Authenticator:
    return Authenticator(
        app[DB_ENGINE],
        app[CLOCK],
        app[MASTER_KEY],
        app[PASSWORD_HASHER],
        app[SETTINGS].accounts,
        app[TECHNICAL_LOG].log,
    )


def enroller(app: web.Application) -> Enroller:
    return Enroller(
        app[DB_ENGINE],
        app[CLOCK],
        app[MASTER_KEY],
        app[PASSWORD_HASHER],
        app[SETTINGS].accounts,
        app[TECHNICAL_LOG].log,
    )
