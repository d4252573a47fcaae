"""The organisation's access log for its admins: read with filters, export, verify.

An export is what a NEN 7513 request asks for (who looked at what, when,
with what outcome): every record the filters select, as CSV or JSON,
read and formatted by a worker process (audit/export_walk.py) a batch at a
time, and streamed on as it comes: a long log needs no more memory than a
batch, and the event loop, which relays consults, only copies bytes.
"""

from __future__ import annotations

import json
import re
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.access_log import chain_of, read_access_log, verify_chain
from audit.accounts import Role
from audit.chain_workers import walk_location
from audit.db import reading
from audit.errors import DatabaseError
from audit.export_walk import ExportSpec
from audit.export_workers import exported_chunks
from audit.pace import rest_after
from server.api.access_records import record_read
from server.api.errors import Unprocessable
from server.api.query import NO_PARAMS, day_start, query_date, query_params, query_uuid, query_zone
from server.api.representations import access_record_json, iso
from server.app_keys import CLOCK, DB_ENGINE
from server.auth.sessions import require_role
from server.ws.registry import bulk_peers, bulk_share

routes = web.RouteTableDef()

ACCESS_LOG_PAGE = 100
# Records the export's worker reads at a time, each batch in a short read
# of its own (appends go on meanwhile). In the worker's process, a batch
# holds no event loop; a larger one is fewer round trips.
EXPORT_BATCH = 2_000
FILTER_PARAMS = frozenset({"from", "to", "tz", "actor", "action", "object"})
EXPORT_FORMATS = ("csv", "json")
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
    actor_id = query_uuid(params, "actor", what="an account id")
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


def export_spec(
    engine: AsyncEngine,
    organisation_id: uuid.UUID,
    chosen: LogFilter,
    export_format: str,
    json_head: str,
    batch: int | None = None,
    share: float = 1.0,
    peers: str | None = None,
) -> ExportSpec:
    """What the export's worker reads (``batch`` records at a time, by default
    :data:`EXPORT_BATCH`), how it writes it and how much of the time it may
    keep busy, with the paced jobs registered in ``peers`` (audit/pace.py)."""
    rest_after(0.0, share)  # refused here, not in the worker
    location = walk_location(engine)
    if location is None:
        raise DatabaseError("an in-memory database cannot be exported by a worker process")
    return ExportSpec(
        backend=location[0],
        location=location[1],
        chain=chain_of(organisation_id),
        export_format=export_format,
        batch=EXPORT_BATCH if batch is None else batch,
        since=iso(chosen.since),
        until=iso(chosen.until),
        actor_id=None if chosen.actor_id is None else str(chosen.actor_id),
        action=chosen.action,
        object_id=chosen.object_id,
        json_head=json_head,
        share=share,
        peers=peers,
    )


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
    head = ""
    if export_format == "json":
        described = {
            "organisation_id": str(organisation_id),
            "exported_at": iso(now),
            "filters": {key: value for key, value in params.items() if key != "format"},
        }
        head = json.dumps(described)[:-1] + ', "records": [\n'
    # Paced while the node has consults (database.bulk_share): they keep a core.
    spec = export_spec(
        request.app[DB_ENGINE],
        organisation_id,
        chosen,
        export_format,
        head,
        share=bulk_share(request.app),
        peers=bulk_peers(request.app),
    )
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
    try:
        # Closed on the way out, also when the client went away: that kills the worker.
        async with aclosing(exported_chunks(spec)) as chunks:
            async for chunk in chunks:
                try:
                    await response.write(chunk)
                except ConnectionError:
                    # The client went away: nothing failed here. (Raised on,
                    # the error middleware would take it for the database
                    # being away.) aiohttp drops the response quietly.
                    return response
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
    query_params(request, NO_PARAMS)
    # From the engine: each batch in its own short transaction, so appends go
    # on; paced while the node has consults, so that they keep a core.
    report = await verify_chain(
        request.app[DB_ENGINE],
        chain=chain_of(principal.account.organisation_id),
        share=bulk_share(request.app),
        peers=bulk_peers(request.app),
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
