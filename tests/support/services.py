"""Reaching the real services the tests use: PostgreSQL, Redis (and, in conftest,
Chromium). A test whose service is missing skips with the reason, or under
``CI=true`` fails: CI never passes on skipped real-service tests."""

from __future__ import annotations

import os
from typing import NoReturn

import asyncpg
import pytest
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


POSTGRES_ADMIN_URL = os.environ.get(
    "VIDEOCONSULT_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


REDIS_URL = os.environ.get("VIDEOCONSULT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


reachability: dict[str, str | None] = {}


def service_unavailable(service: str, reason: str) -> NoReturn:
    """Skip the test, or under CI=true fail it, because ``service`` is missing."""
    if IN_CI:
        pytest.fail(f"{service} is required when CI=true, but {reason}", pytrace=False)
    pytest.skip(f"{service} not reachable ({reason}); start it to run this test")


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def postgres_problem() -> str | None:
    if "postgres" not in reachability:
        try:
            connection = await asyncpg.connect(asyncpg_dsn(POSTGRES_ADMIN_URL), timeout=3)
            await connection.close()
            reachability["postgres"] = None
        except (OSError, asyncpg.PostgresError, TimeoutError) as err:
            reachability["postgres"] = f"{POSTGRES_ADMIN_URL}: {type(err).__name__}: {err}"
    return reachability["postgres"]


async def redis_problem() -> str | None:
    if "redis" not in reachability:
        client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        try:
            await client.ping()
            reachability["redis"] = None
        except (OSError, aioredis.RedisError) as err:
            reachability["redis"] = f"{REDIS_URL}: {type(err).__name__}: {err}"
        finally:
            await client.aclose()
    return reachability["redis"]
