"""What every command module shares: the error type and the command contract.

A command module exposes ``register(subparsers)``, which adds its parser and
sets ``run=`` to a function ``(settings, args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit import (
    SchemaOutOfDate,
    database_url,
    load_master_key,
    open_database,
    prepare_data_dir,
)
from audit.access_log import Actor, record_access
from audit.accounts import Organisation, get_organisation_by_name
from audit.clock import SystemClock
from audit.db import reading
from audit.errors import NotFound
from audit.migrate import ensure_current, missing_sqlite_file
from config import Settings

T = TypeVar("T")

Run = Callable[[Settings, argparse.Namespace], int]


class CliError(Exception):
    """A command failed in a way the user can fix; the message says how."""


class CommandModule(Protocol):
    def register(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        """Add this module's command (and its subcommands) to ``subparsers``."""


def require_database(settings: Settings) -> None:
    """Raise :class:`CliError` naming the data directory when its SQLite
    database is not there; create nothing."""
    if missing_sqlite_file(database_url(settings, settings.data_dir)) is not None:
        raise CliError(
            f"no database in {settings.data_dir} (the data directory): run "
            "`videoconsult db upgrade` to create it there, or point "
            "VIDEOCONSULT_DATA_DIR at your server's"
        )


def root_key(settings: Settings) -> bytes:
    """The installation's master key, for a command on its database: looked
    for only once the database is there (in development the key would be
    made in a data directory that holds no installation)."""
    require_database(settings)
    return load_master_key(settings, prepare_data_dir(settings.data_dir)).key


@asynccontextmanager
async def current_database(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The database, if its schema is current (else SchemaOutOfDate); disposed after.

    Without a SQLite database in the data directory, raises :class:`CliError`
    naming the directory, and creates nothing there: a command run with
    another data directory must not start a second, empty database.
    """
    require_database(settings)
    data_dir = prepare_data_dir(settings.data_dir)
    new_file = missing_sqlite_file(database_url(settings, data_dir))
    engine = await open_database(settings, data_dir, migrate=False)
    try:
        try:
            await ensure_current(engine)
        except SchemaOutOfDate:
            await engine.dispose()
            if new_file is not None:
                new_file.unlink(missing_ok=True)  # looking must not create a database
            raise
        yield engine
    finally:
        await engine.dispose()


# Written by ``serve`` into the data directory while it runs: where it
# listens (``--host``/``--port`` included), for links printed by other
# commands when server.public_url is not set.
SERVING_FILE = "serving.json"


def serving_file(data_dir: Path) -> Path:
    return data_dir.expanduser().absolute() / SERVING_FILE


def public_origin(settings: Settings) -> tuple[str, str]:
    """The origin links should use, and where it comes from: server.public_url;
    else where a running ``serve`` of this data directory listens; else the
    configured server.host and server.port."""
    if settings.server.public_origin:
        return settings.server.public_origin, "server.public_url"
    running = _running_server_origin(serving_file(settings.data_dir))
    if running is not None:
        return running, "serve"
    host = settings.server.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.server.port}", "settings"


def _running_server_origin(path: Path) -> str | None:
    try:
        recorded = json.loads(path.read_text())
        pid, origin = int(recorded["pid"]), str(recorded["origin"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)  # a file left by a server that died is not believed
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return origin


async def operator_read(
    engine: AsyncEngine,
    organisation_name: str,
    read: Callable[[AsyncConnection, Organisation], Awaitable[T]],
    *,
    action: str,
) -> tuple[Organisation, T]:
    """The operator's read of one organisation's data, and its access record.

    ``read`` runs with the organisation through :func:`audit.db.reading` (no
    write lock on SQLite); then the record (``action``, the organisation as
    its object) is committed in a short write of its own, before the command
    prints anything. An unknown organisation is a :class:`CliError` naming it.
    """
    async with reading(engine) as conn:
        try:
            organisation = await get_organisation_by_name(conn, organisation_name)
        except NotFound as err:
            raise CliError(str(err)) from None
        found = await read(conn, organisation)
    await record_operator_access(
        engine,
        organisation_id=organisation.id,
        action=action,
        object_type="organisation",
        object_id=organisation.id,
    )
    return organisation, found


async def record_operator_access(
    engine: AsyncEngine,
    *,
    organisation_id: uuid.UUID | None,
    action: str,
    object_type: str,
    object_id: uuid.UUID,
) -> None:
    """The operator's access record, committed in a short write of its own
    (a read's record, written before the command prints what it read)."""
    await record_operator_reads(
        engine,
        organisation_id=organisation_id,
        action=action,
        object_type=object_type,
        object_ids=[object_id],
    )


async def record_operator_reads(
    engine: AsyncEngine,
    *,
    organisation_id: uuid.UUID | None,
    action: str,
    object_type: str,
    object_ids: list[uuid.UUID],
) -> None:
    """A record of the operator's for each object read (each consult whose
    data an export showed), all committed in one short write."""
    now = SystemClock().now()
    async with engine.begin() as conn:
        for object_id in object_ids:
            await record_access(
                conn,
                Actor.operator(),
                organisation_id=organisation_id,
                action=action,
                object_type=object_type,
                object_id=object_id,
                now=now,
            )
