"""The organisation's access log for its admins: read with filters, export, verify.

An export is what a NEN 7513 request asks for (who looked at what, when,
with what outcome): every record the filters select, as CSV or JSON,
streamed a batch at a time so that a long log needs no more memory than
one batch, and formatted in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from audit.access_log import (
    AccessRecord,
    chain_of,
    read_access_log,
    verify_chain,
)
from audit.accounts import Role
from audit.db import reading
from server.api.access_records import record_read
from server.api.errors import Unprocessable
from server.api.query import day_start, query_date, query_params, query_zone
from server.api.representations import access_record_json, iso
from server.app_keys import CLOCK, DB_ENGINE
from server.auth.sessions import require_role

routes = web.RouteTableDef()

ACCESS_LOG_PAGE = 100
# Records an export reads at a time. Their rows are made into records on the
# event loop (SQLAlchemy's conversion, ~12 µs a row): 250 hold it about 3 ms
# on a busy 2-core host, 1,000 held it 13 ms of CPU, 140-190 ms under the
# signaling benchmark's load (docs/benchmarks.md, "Signaling with recordings
# and bulk jobs"). The export is no slower for it: the smaller reads are
# quicker per record.
EXPORT_BATCH = 250
FILTER_PARAMS = frozenset({"from", "to", "tz", "actor", "action", "object"})
EXPORT_FORMATS = ("csv", "json")
CSV_COLUMNS = (
    "seq",
    "at",
    "actor_id",
    "actor_role",
    "action",
    "object_type",
    "object_id",
    "outcome",
    "client_type",
    "hash",
)
_SEQ = re.compile(r"[0-9]{1,18}")
_ACTION = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_OBJECT = re.compile(r"[\x21-\x7e ]{1,64}")


@dataclass(frozen=True)
class LogFilter:
    """What an admin asked for: a day range (in a time zone) and who, what, which object."""

    since: datetime | None
    until: datetime | None
    actor_id: uuid.UUID | None
    action: str | None
    object_id: str | None

    def query(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "actor_id": self.actor_id,
            "action": self.action,
            "object_id": self.object_id,
        }


def _filter(params: dict[str, str]) -> LogFilter:
    zone, _name = query_zone(params)
    first, last = query_date(params, "from"), query_date(params, "to")
    if first is not None and last is not None and first > last:
        raise Unprocessable("parameter 'from' must not lie after 'to'")
    actor_id = None
    if "actor" in params:
        try:
            actor_id = uuid.UUID(params["actor"])
        except ValueError:
            raise Unprocessable("parameter 'actor' must be an account id (a UUID)") from None
    action = params.get("action")
    if action is not None and (len(action) > 64 or not _ACTION.fullmatch(action)):
        raise Unprocessable(
            "parameter 'action' must be an action such as account.create, or its first "
            "part (account)"
        )
    object_id = params.get("object")
    if object_id is not None and not _OBJECT.fullmatch(object_id):
        raise Unprocessable("parameter 'object' must be an object id of at most 64 characters")
    return LogFilter(
        since=None if first is None else day_start(first, zone),
        until=None if last is None else day_start(last + timedelta(days=1), zone),
        actor_id=actor_id,
        action=action,
        object_id=object_id,
    )


@routes.get("/api/admin/access-log")
async def access_log_read(request: web.Request) -> web.Response:
    """The organisation's access records, newest first, a page at a time."""
    principal = await require_role(request, Role.ADMIN, action="access_log.read")
    params = query_params(request, FILTER_PARAMS | {"before"})
    before = params.get("before")
    before_seq: int | None = None
    if before is not None:
        if not _SEQ.fullmatch(before) or int(before) < 1:
            raise Unprocessable("parameter 'before' must be a record's seq (a positive number)")
        before_seq = int(before)
    chosen = _filter(params)
    organisation_id = principal.account.organisation_id
    async with reading(request.app[DB_ENGINE]) as conn:
        found = await read_access_log(
            conn, organisation_id, limit=ACCESS_LOG_PAGE, before_seq=before_seq, **chosen.query()
        )
    await record_read(
        request,
        principal,
        action="access_log.read",
        object_id=organisation_id,
        object_type="organisation",
    )
    more = len(found) == ACCESS_LOG_PAGE
    return web.json_response(
        {
            "records": [access_record_json(entry) for entry in found],
            "next_before": found[-1].seq if more else None,
        }
    )


def _csv_lines(batch: list[AccessRecord], *, header: bool) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(CSV_COLUMNS)
    for entry in batch:
        row = access_record_json(entry)
        writer.writerow(["" if row[name] is None else row[name] for name in CSV_COLUMNS])
    return out.getvalue().encode()


def _json_items(batch: list[AccessRecord], *, first: bool) -> bytes:
    items = ",\n".join(json.dumps(access_record_json(entry)) for entry in batch)
    return (items if first else ",\n" + items).encode() if items else b""


@routes.get("/api/admin/access-log/export")
async def access_log_export(request: web.Request) -> web.StreamResponse:
    """Every record the filters select, newest first, as a CSV or JSON download."""
    principal = await require_role(request, Role.ADMIN, action="access_log.export")
    params = query_params(request, FILTER_PARAMS | {"format"})
    export_format = params.get("format", "csv")
    if export_format not in EXPORT_FORMATS:
        raise Unprocessable("parameter 'format' must be csv or json")
    chosen = _filter(params)
    organisation_id = principal.account.organisation_id
    now = request.app[CLOCK].now()
    # The record comes first (committed, through the access-log writer): an
    # export that breaks off was still a read.
    await record_read(
        request,
        principal,
        action="access_log.export",
        object_type="organisation",
        object_id=organisation_id,
    )
    name = f"access-log-{now:%Y-%m-%d}.{export_format}"
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8"
            if export_format == "csv"
            else "application/json",
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        }
    )
    await response.prepare(request)
    if export_format == "json":
        head = {
            "organisation_id": str(organisation_id),
            "exported_at": iso(now),
            "filters": {key: value for key, value in params.items() if key != "format"},
        }
        await response.write(json.dumps(head)[:-1].encode() + b', "records": [\n')
    try:
        await _write_records(request, response, organisation_id, chosen, export_format)
    except BaseException:
        # The headers said 200: a download that breaks off must not end like a
        # whole one (a NEN 7513 answer missing records). Closing the
        # connection without the last chunk tells the browser it failed.
        if request.transport is not None:
            request.transport.close()
        raise
    await response.write_eof()
    return response


@routes.get("/api/admin/access-log/verify")
async def access_log_verify(request: web.Request) -> web.Response:
    """Walk the organisation's access-log chain (as `videoconsult audit verify` does for all)."""
    principal = await require_role(request, Role.ADMIN, action="access_log.verify")
    # From the engine: each batch in its own short transaction, so appends go on.
    report = await verify_chain(
        request.app[DB_ENGINE], chain=chain_of(principal.account.organisation_id)
    )
    await record_read(
        request, principal, action="access_log.verify", object_type="access_log", object_id=None
    )
    broken = report.broken
    return web.json_response(
        {
            "intact": broken is None,
            "records": report.records,
            "broken": None
            if broken is None
            else {
                "chain": broken.chain,
                "seq": broken.seq,
                "kind": broken.kind.value,
                "detail": broken.detail,
            },
        }
    )


async def _write_records(
    request: web.Request,
    response: web.StreamResponse,
    organisation_id: uuid.UUID,
    chosen: LogFilter,
    export_format: str,
) -> None:
    """The export's records, batch by batch, newest first; the JSON's end."""
    before_seq: int | None = None
    first = True
    while True:
        # Each batch in a short read of its own: appends go on meanwhile.
        async with reading(request.app[DB_ENGINE]) as conn:
            batch = await read_access_log(
                conn, organisation_id, limit=EXPORT_BATCH, before_seq=before_seq, **chosen.query()
            )
        if export_format == "csv":
            chunk = await asyncio.to_thread(_csv_lines, batch, header=first)
        else:
            chunk = await asyncio.to_thread(_json_items, batch, first=first)
        await response.write(chunk)
        first = first and not batch
        if len(batch) < EXPORT_BATCH:
            break
        before_seq = batch[-1].seq
    if export_format == "json":
        await response.write(b"\n]}\n")
