"""``videoconsult audit``: the access log's hash chain."""

from __future__ import annotations

import argparse
import asyncio

from audit.access_log import verify_chain
from config import Settings
from server.cli.base import current_database

EXIT_BROKEN = 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="check the access log",
        description="Check the access log (who read or changed what, and when).",
    )
    commands = parser.add_subparsers(title="audit commands", metavar="AUDIT_COMMAND", required=True)
    verify = commands.add_parser(
        "verify",
        help="walk the access log's hash chain and name the first broken link",
        description=(
            "Walk the access log's hash chains (one per organisation, one for the "
            "installation) from their start. Exit 0 when all are intact; otherwise name "
            "the first broken link (a record modified, deleted, inserted or reordered) "
            "and exit 1."
        ),
    )
    verify.set_defaults(run=run_verify)


def run_verify(settings: Settings, _args: argparse.Namespace) -> int:
    async def _verify() -> int:
        async with current_database(settings) as engine:
            report = await verify_chain(engine)
        if report.broken is None:
            print(f"access log intact: {report.records} records in {report.chains} chains")
            return 0
        broken = report.broken
        print(
            f"access log BROKEN in chain {broken.chain} at record {broken.seq} "
            f"({broken.kind.value}): {broken.detail}; the records before it are intact"
        )
        return EXIT_BROKEN

    return asyncio.run(_verify())
