"""The database being away, as the API answers it: 503, said once per outage.

While PostgreSQL (or the SQLite file) cannot be reached, every request that
needs it answers 503 ``unavailable`` with ``Retry-After``, not a 500 with a
traceback each. The first such request logs one line and starts a probe that
asks the database every few seconds; when it answers, one more line says how
long the outage lasted and how many requests were turned away. Readiness
(``/readyz``) reports the database down meanwhile, on its own check.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from aiohttp import web

from audit import DatabaseUnavailable, check_connection
from server.app_keys import DB_ENGINE

_log = structlog.get_logger("videoconsult.server")

# How often the probe asks whether the database is back.
PROBE_S = 2.0


class DatabaseOutage:
    def __init__(self) -> None:
        self.refused = 0
        self._since: float | None = None
        self._probe: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self._since is not None

    def noticed(self, app: web.Application, error: BaseException) -> None:
        """A request failed because the database is away."""
        self.refused += 1
        if self._since is not None:
            return
        self._since = time.monotonic()
        _log.warning(
            "database unavailable: requests that need it answer 503 until it is back",
            error=type(error).__name__,
        )
        self._probe = asyncio.create_task(self._until_back(app))

    async def _until_back(self, app: web.Application) -> None:
        while True:
            await asyncio.sleep(PROBE_S)
            with contextlib.suppress(DatabaseUnavailable):
                await check_connection(app[DB_ENGINE], timeout_s=PROBE_S)
                break
        since = self._since or time.monotonic()
        _log.info(
            "database is back",
            after_s=round(time.monotonic() - since, 1),
            requests_refused=self.refused,
        )
        self._since, self.refused, self._probe = None, 0, None

    async def close(self, _app: web.Application) -> None:
        """on_cleanup: stop probing."""
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe


DB_OUTAGE = web.AppKey("db_outage", DatabaseOutage)
