"""``videoconsult billing``: a month of an organisation's consults per therapist."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

from audit.billing import (
    BilledConsult,
    ExportFormat,
    as_csv,
    month_bounds,
    month_of_consults,
    parse_month,
    row_of,
    totals,
)
from config import Settings
from config.zones import known_zone
from server.cli.base import (
    CliError,
    current_database,
    operator_read,
    record_operator_reads,
    root_key,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "billing",
        help="export a month of consults for billing",
        description="A month of an organisation's consults per therapist, for its billing.",
    )
    commands = parser.add_subparsers(
        title="billing commands", metavar="BILLING_COMMAND", required=True
    )
    export = commands.add_parser(
        "export",
        help="print a month of consults as CSV (plain or for Excel) or JSON",
        description=(
            "Print the organisation's consults of MONTH (by their start; never started: "
            "their appointment, else when they were made), a row per consult with its "
            "therapist, times, duration, status and the practice's appointment reference "
            "where it is still kept; nothing about patients. The read is in the access log."
        ),
    )
    export.add_argument("--org", required=True, help="the organisation's name")
    export.add_argument("--month", required=True, help="the month, as YYYY-MM")
    export.add_argument(
        "--tz", default="UTC", help="the time zone of the month's days (default UTC)"
    )
    export.add_argument(
        "--format",
        choices=sorted(member.value for member in ExportFormat),
        default=ExportFormat.CSV.value,
        help=(
            "csv (default): RFC 4180, commas, UTF-8, for programs; excel: for Excel in a "
            "European locale (a byte-order mark, semicolons, the practice's ids as text); "
            "json: the rows and each therapist's totals"
        ),
    )
    export.set_defaults(run=run_export)


def run_export(settings: Settings, args: argparse.Namespace) -> int:
    try:
        first_day = parse_month(args.month)
    except ValueError as err:
        raise CliError(f"--month must be {err}") from None
    try:
        zone = known_zone(args.tz)
    except ValueError:
        raise CliError(f"--tz {args.tz!r} is not a time zone this machine knows") from None
    since, until = month_bounds(first_day, zone)
    # The appointment references still kept are unsealed for the export.
    master_key = root_key(settings)

    async def _export() -> tuple[uuid.UUID, list[BilledConsult]]:
        async with current_database(settings) as engine:
            organisation, entries = await operator_read(
                engine,
                args.org,
                lambda conn, organisation: month_of_consults(
                    conn, organisation.id, master_key, since=since, until=until
                ),
                action="billing.export",
            )
            # Each appointment reference shown is a read of that consult's
            # personal data: its own record, which the patient's receipt lists.
            await record_operator_reads(
                engine,
                organisation_id=organisation.id,
                action="billing.export",
                object_type="consult",
                object_ids=[entry.consult_id for entry in entries if entry.appointment_reference],
            )
            return organisation.id, entries

    organisation_id, entries = asyncio.run(_export())
    export_format = ExportFormat(args.format)
    if export_format is not ExportFormat.JSON:
        sys.stdout.buffer.write(as_csv(entries, zone, export_format))
    else:
        document = {
            "organisation_id": str(organisation_id),
            "month": f"{first_day:%Y-%m}",
            "time_zone": args.tz,
            "therapists": totals(entries),
            "consults": [row_of(entry, zone) for entry in entries],
        }
        print(json.dumps(document, indent=2))
    return 0
