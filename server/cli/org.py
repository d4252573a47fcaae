"""``videoconsult org``: the organisations (practices, clinics) of this installation."""

from __future__ import annotations

import argparse
import asyncio

from audit.access_log import Actor, record_access
from audit.accounts import create_organisation, list_organisations
from audit.clock import SystemClock
from audit.db import reading
from config import Settings
from server.cli.base import current_database


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "org",
        help="manage organisations",
        description="Manage the organisations (practices, clinics) this installation serves.",
    )
    commands = parser.add_subparsers(title="org commands", metavar="ORG_COMMAND", required=True)
    add = commands.add_parser("add", help="add an organisation", description="Add an organisation.")
    add.add_argument("name", help="its name, unique in this installation")
    add.set_defaults(run=run_add)
    listing = commands.add_parser(
        "list", help="list the organisations", description="List the organisations."
    )
    listing.set_defaults(run=run_list)


def run_add(settings: Settings, args: argparse.Namespace) -> int:
    async def _add() -> None:
        async with current_database(settings) as engine, engine.begin() as conn:
            now = SystemClock().now()
            organisation = await create_organisation(conn, args.name, now=now)
            await record_access(
                conn,
                Actor.operator(),
                organisation_id=organisation.id,
                action="organisation.create",
                object_type="organisation",
                object_id=organisation.id,
                now=now,
            )
        print(f"organisation {organisation.name!r} added ({organisation.id})")

    asyncio.run(_add())
    return 0


def run_list(settings: Settings, _args: argparse.Namespace) -> int:
    async def _list() -> None:
        async with current_database(settings) as engine, reading(engine) as conn:
            organisations = await list_organisations(conn)
        for organisation in organisations:
            print(f"{organisation.id}  {organisation.name}")
        if not organisations:
            print("no organisations yet: add one with `videoconsult org add NAME`")

    asyncio.run(_list())
    return 0
