"""The application factory: health, readiness, start-up resources, shutdown."""

from __future__ import annotations

import asyncio
import base64
import gc
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.test_utils import TestServer
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from audit import DEV_MASTER_KEY_FILE, current_revision, head_revision
from audit.db import close_engine, reading
from audit.schema import organisations
from server import create_app
from server.app_keys import DB_ENGINE, MASTER_KEY, WEBSOCKETS
from server.background import Job, JobName, periodic
from tests.support.harness import Harness, Sockets, new_consult, receive
from tests.support.services import asyncpg_dsn
from tests.support.settings import SettingsFactory


async def test_healthz_answers_while_the_process_runs(
    make_settings: SettingsFactory, aiohttp_client
) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_start_applies_migrations_to_the_configured_database(
    make_settings: SettingsFactory, empty_database_url: str, aiohttp_client
) -> None:
    app = create_app(make_settings(database_url=empty_database_url))
    await aiohttp_client(app)
    assert await current_revision(app[DB_ENGINE]) == head_revision()


async def test_readyz_is_ready_with_database_and_redis_reachable(
    make_settings: SettingsFactory, database_url: str, redis_url: str, aiohttp_client
) -> None:
    app = create_app(make_settings(database_url=database_url, redis_url=redis_url))
    client = await aiohttp_client(app)
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "redis": "ok"},
    }


async def test_readyz_without_redis_configured_checks_only_the_database(
    make_settings: SettingsFactory, aiohttp_client
) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    response = await client.get("/readyz")
    assert response.status == 200
    assert (await response.json())["checks"] == {"database": "ok", "redis": "not configured"}


async def test_readyz_is_503_with_the_reason_when_redis_is_unreachable(
    make_settings: SettingsFactory, free_port: int, aiohttp_client
) -> None:
    settings = make_settings(
        redis_url=f"redis://127.0.0.1:{free_port}/0", redis_connect_timeout_s=1
    )
    client = await aiohttp_client(create_app(settings))
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "not ready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"].startswith("unreachable: ")


async def test_readyz_is_503_when_the_database_goes_away(
    make_settings: SettingsFactory, migrated_postgres_url: str, aiohttp_client
) -> None:
    settings = make_settings(database_url=migrated_postgres_url, database_connect_timeout_s=2)
    client = await aiohttp_client(create_app(settings))
    assert (await client.get("/readyz")).status == 200

    name = migrated_postgres_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(asyncpg_dsn(migrated_postgres_url.rsplit("/", 1)[0] + "/test"))
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()

    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["checks"]["database"] == "unreachable: database does not exist"


async def test_development_mode_generates_a_master_key_once_and_reuses_it(
    make_settings: SettingsFactory, data_dir: Path, aiohttp_client
) -> None:
    first = create_app(make_settings())
    await aiohttp_client(first)
    key_file = data_dir / DEV_MASTER_KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    second = create_app(make_settings())
    await aiohttp_client(second)
    assert first[MASTER_KEY].key == second[MASTER_KEY].key
    assert len(first[MASTER_KEY].key) == 32
    assert first[MASTER_KEY].dev_key_file == key_file
    assert base64.urlsafe_b64encode(first[MASTER_KEY].key).decode() not in repr(first[MASTER_KEY])


async def test_configured_master_key_is_used_and_no_key_file_is_written(
    make_settings: SettingsFactory, data_dir: Path, aiohttp_client
) -> None:
    key = secrets.token_bytes(32)
    settings = make_settings(
        mode="production",
        security_master_key=base64.urlsafe_b64encode(key).decode(),
        server_public_url="https://video.clinic.example",
    )
    app = create_app(settings)
    await aiohttp_client(app)
    assert app[MASTER_KEY].key == key
    assert app[MASTER_KEY].dev_key_file is None
    assert not (data_dir / DEV_MASTER_KEY_FILE).exists()


async def test_data_directory_is_private_to_the_service(
    make_settings: SettingsFactory, data_dir: Path, aiohttp_client
) -> None:
    await aiohttp_client(create_app(make_settings()))
    assert data_dir.stat().st_mode & 0o777 == 0o700


async def test_shutdown_closes_open_signaling_sockets_with_going_away(
    harness: Harness, sockets: Sockets
) -> None:
    app = harness.app
    opened = []
    await new_consult(harness)
    for _ in range(3):
        response = await harness.post("/api/consults", {})
        socket = await sockets.therapist((await response.json())["consult"]["id"])
        await receive(socket, "welcome")
        opened.append(socket)
    assert len(app[WEBSOCKETS]) == 3

    await harness.client.server.close()

    for websocket in opened:
        message = await websocket.receive(timeout=5)
        assert message.type is WSMsgType.CLOSE
        assert message.data == WSCloseCode.GOING_AWAY
    # Shutdown waited until each socket's room had heard that it went.
    assert app[WEBSOCKETS] == set()


async def test_background_jobs_finish_their_write_before_the_database_closes(
    make_settings: SettingsFactory, database_url: str, aiohttp_client
) -> None:
    started = asyncio.Event()
    org_id = uuid.uuid4()

    async def writes_on_cancel(app: web.Application) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            async with app[DB_ENGINE].begin() as connection:
                await connection.execute(
                    organisations.insert().values(
                        id=org_id, name="written on shutdown", created_at=datetime.now(UTC)
                    )
                )

    settings = make_settings(database_url=database_url)
    app = create_app(settings)
    app.cleanup_ctx.append(
        periodic(Job(JobName.HOUSEKEEPING, writes_on_cancel, 3600.0, first_after_s=0.0))
    )
    server = TestServer(app)
    await aiohttp_client(server)
    await asyncio.wait_for(started.wait(), 5)
    await server.close()

    # A second app on the same database sees the row: the write completed.
    reader = create_app(settings)
    await aiohttp_client(reader)
    async with reader[DB_ENGINE].connect() as connection:
        names = await connection.scalars(
            sa.select(organisations.c.name).where(organisations.c.id == org_id)
        )
        assert list(names) == ["written on shutdown"]


async def test_a_failing_background_step_is_counted_and_stops_nothing_else(
    make_settings: SettingsFactory, aiohttp_client
) -> None:
    later_cleanup_ran = asyncio.Event()
    crashed = asyncio.Event()
    calls = 0

    async def crashes(_app: web.Application) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            crashed.set()
        raise RuntimeError("task broke")

    async def marks_cleanup(_app: web.Application) -> AsyncIterator[None]:
        yield
        later_cleanup_ran.set()

    app = create_app(make_settings())
    app.cleanup_ctx.append(marks_cleanup)
    app.cleanup_ctx.append(
        periodic(Job(JobName.RETENTION, crashes, 0.01, first_after_s=0.0, backoff_max_s=0.02))
    )
    server = TestServer(app)
    client = await aiohttp_client(server)
    await asyncio.wait_for(crashed.wait(), 5)  # tried again after failing
    assert (await client.get("/healthz")).status == 200
    metrics = await (await client.get("/metrics")).text()
    counted = re.search(
        r'^videoconsult_background_failures_total\{job="retention"\} (\S+)$', metrics, re.M
    )
    assert counted is not None
    assert 2 <= float(counted.group(1)) <= calls
    await server.close()
    assert later_cleanup_ran.is_set()


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_endpoints_refuse_other_methods(
    make_settings: SettingsFactory, path: str, aiohttp_client
) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    response = await client.post(path, headers={"Origin": str(client.make_url("/"))[:-1]})
    assert response.status == 405
    assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_start_without_migration_refuses_an_out_of_date_schema(
    make_settings: SettingsFactory, data_dir: Path, aiohttp_client
) -> None:
    from audit import SchemaOutOfDate

    runner = web.AppRunner(create_app(make_settings(database_migrate_on_start="false")))
    try:
        with pytest.raises(SchemaOutOfDate, match="run `videoconsult db upgrade`"):
            await runner.setup()
    finally:
        await runner.cleanup()


async def test_existing_data_directory_open_to_others_is_made_private(
    make_settings: SettingsFactory, data_dir: Path, aiohttp_client
) -> None:
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    await aiohttp_client(create_app(make_settings()))
    assert data_dir.stat().st_mode & 0o777 == 0o700


async def read_holding_its_connection(
    engine: AsyncEngine, release: asyncio.Event, *, close_it: bool = False
) -> asyncio.Task[None]:
    """A read that holds its pooled connection until ``release`` is set
    (then closes it, with ``close_it``); returned once it holds it."""
    holding = asyncio.Event()

    async def read() -> None:
        async with reading(engine) as conn:
            await conn.execute(sa.text("SELECT 1"))
            holding.set()
            await release.wait()
            if close_it:
                await conn.invalidate()

    task = asyncio.create_task(read())
    await holding.wait()
    return task


async def test_a_database_read_still_running_at_shutdown_closes_its_connection(
    make_settings: SettingsFactory,
) -> None:
    """A change the shutdown outlasted (``Changes.drain`` waits 5 s at most;
    CI's busy host saw one) still holds a pooled connection when the engine
    is disposed. It used to give the connection back to the disposed pool,
    where nobody closed it: aiosqlite's "deleted before being closed"
    warning at some later garbage collection, in whatever test ran then."""
    app = create_app(make_settings())
    runner = web.AppRunner(app)
    await runner.setup()
    engine = app[DB_ENGINE]
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    release = asyncio.Event()
    task = await read_holding_its_connection(engine, release)
    # The read ends while the shutdown waits for its connection.
    asyncio.get_running_loop().call_later(0.2, release.set)
    await runner.cleanup()
    await task
    # Had the connection been left to the garbage collector, the unraisable
    # warning would fail this test here (filterwarnings = error).
    del task, pool
    gc.collect()


async def test_a_shutdown_waits_for_a_connection_in_use_no_longer_than_its_bound(
    make_settings: SettingsFactory,
) -> None:
    app = create_app(make_settings())
    runner = web.AppRunner(app)
    await runner.setup()
    engine = app[DB_ENGINE]
    release = asyncio.Event()
    # Its pool is gone when it ends: the read closes its connection itself.
    task = await read_holding_its_connection(engine, release, close_it=True)
    started = asyncio.get_running_loop().time()
    assert await close_engine(engine, wait_s=0.3) == 1
    assert 0.3 <= asyncio.get_running_loop().time() - started < 2.0
    release.set()
    await task
    await runner.cleanup()
    del task
    gc.collect()
