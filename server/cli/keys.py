"""``videoconsult keys``: the master key ring that wraps data keys (recordings',
therapists' labels', appointment references').

Rotation and retirement are recorded in the installation's access-log chain
with the actor "operator" and client type "cli" (object: the master key's
public id). Listing shows ids and counts only, nothing personal, and is not
recorded, like ``org list``.
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from audit.access_log import Actor, record_access
from audit.clock import SystemClock
from audit.db import reading
from audit.keyring import (
    KeyRing,
    Rotation,
    WrappingKey,
    key_id_of,
    key_usage,
    load_ring,
    retire,
    rotate,
)
from config import Settings
from server.cli.base import current_database, root_key


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "keys",
        help="manage the master keys that wrap recordings', labels' and references' keys",
        description=(
            "The master key ring: the configured master key (security.master_key) is its "
            "root; the newest ring key wraps new data keys (recordings, labels, references)."
        ),
    )
    commands = parser.add_subparsers(title="keys commands", metavar="KEYS_COMMAND", required=True)
    listing = commands.add_parser(
        "list",
        help="list the master keys and how many data keys each wraps",
        description="List the master keys (root first, the current one marked) and their use.",
    )
    listing.set_defaults(run=run_list)
    rotation = commands.add_parser(
        "rotate",
        help="add a new master key and re-wrap every data key under it",
        description=(
            "Add a new master key, sealed by the root, make it current, and re-wrap every "
            "data key (recordings', labels', appointment references') under it (a batch per "
            "transaction). The files and sealed values are not touched. Interrupted, it can "
            "simply run again."
        ),
    )
    rotation.set_defaults(run=run_rotate)
    retirement = commands.add_parser(
        "retire",
        help="delete an old master key that wraps no data key any more",
        description=(
            "Delete a ring key for good. Refused for the root key, for the current key, "
            "and for a key that still wraps data keys (rotate first)."
        ),
    )
    retirement.add_argument("key_id", metavar="KEY_ID", help="the key's id, as `keys list` shows")
    retirement.set_defaults(run=run_retire)


async def _note(conn: AsyncConnection, action: str, key_id: str, *, now: datetime) -> None:
    """The key operation in the installation's access log, by the operator."""
    await record_access(
        conn,
        Actor.operator(),
        organisation_id=None,
        action=action,
        object_type="master_key",
        object_id=key_id,
        now=now,
    )


def describe_ring(ring: KeyRing, usage: dict[str, int]) -> list[str]:
    """One line per key: id, role (root, current), data keys wrapped."""
    lines = []
    for key_id in ring.keys:
        roles = [
            name
            for name, applies in (
                ("root", key_id == ring.root_id),
                ("current", key_id == ring.current.id),
            )
            if applies
        ]
        lines.append(f"{key_id}  {', '.join(roles) or '-':<13}  {usage.get(key_id, 0)} data keys")
    for key_id, count in sorted(usage.items()):
        if key_id not in ring.keys:
            lines.append(f"{key_id}  {'not in ring':<13}  {count} data keys (cannot be opened)")
    return lines


def run_list(settings: Settings, _args: argparse.Namespace) -> int:
    master_key = root_key(settings)

    async def _list() -> list[str]:
        async with current_database(settings) as engine, reading(engine) as conn:
            ring = await load_ring(conn, master_key)
            return describe_ring(ring, await key_usage(conn, ring.root_id))

    for line in asyncio.run(_list()):
        print(line)
    return 0


def run_rotate(settings: Settings, _args: argparse.Namespace) -> int:
    master_key = root_key(settings)

    async def _rotate() -> Rotation:
        now = SystemClock().now()

        async def note(conn: AsyncConnection, added: WrappingKey) -> None:
            await _note(conn, "keys.rotate", added.id, now=now)

        async with current_database(settings) as engine:
            return await rotate(engine, master_key, now=now, note=note)

    rotation = asyncio.run(_rotate())
    moved = sum(rotation.rewrapped.values())
    print(f"master key {rotation.new_key_id} added; it is the current key now")
    print(f"re-wrapped {moved} data keys; no file was touched")
    root_id = key_id_of(master_key)
    for key_id, count in sorted(rotation.rewrapped.items()):
        if key_id == root_id:
            print(f"  {count} from the root key {key_id} (which stays: it seals the ring)")
        else:
            print(f"  {count} from {key_id}: retire it with `videoconsult keys retire {key_id}`")
    return 0


def run_retire(settings: Settings, args: argparse.Namespace) -> int:
    master_key = root_key(settings)

    async def _retire() -> None:
        async with current_database(settings) as engine, engine.begin() as conn:
            await retire(conn, master_key, args.key_id)
            await _note(conn, "keys.retire", args.key_id, now=SystemClock().now())

    asyncio.run(_retire())
    print(f"master key {args.key_id} retired: it is gone from the ring")
    return 0
