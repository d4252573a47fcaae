"""The support view: pseudonymous consult metadata of the organisation, two
charts, and the technical log of one consult for the last 24 hours.

Every route needs role ``support`` (therapists and admins are refused with
403, and the refusal is access-logged) and sees only the support user's own
organisation. Every read writes one access record, through the access-log
writer, before it is answered; the reads themselves take no write lock
(:func:`audit.db.reading`). Query parameters are checked strictly: an
unknown, repeated or malformed one answers 422 ``invalid_field`` naming it.

A date range is given in days (``from``, ``to``, both included) of the time
zone ``tz`` (default UTC). Without ``from`` and ``to`` it is the last 30
days up to today; with only ``from``, up to today; with only ``to``, the 30
days up to it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection

from audit import support
from audit.access_log import Outcome
from audit.consults import ConsultStatus
from audit.db import reading
from audit.errors import NotFound
from audit.roles import Role
from audit.technical_log import RETENTION
from server.api.access_records import record_read
from server.api.errors import NotFoundError, Unprocessable
from server.api.query import (
    EARLIEST_DAY,
    NO_PARAMS,
    day_start,
    query_date,
    query_number,
    query_params,
    query_zone,
)
from server.api.representations import iso, support_consult_json
from server.api.support_charts import LANGUAGES, consults_per_day_svg, durations_svg
from server.app_keys import CLOCK, DB_ENGINE, MASTER_KEY
from server.auth.sessions import require_role
from signaling.protocol import EndReason

routes = web.RouteTableDef()

ACTION_LIST = "support.consult.list"
ACTION_PER_DAY = "support.chart.consults_per_day"
ACTION_DURATIONS = "support.chart.durations"
ACTION_TECHNICAL_LOG = "support.technical_log.read"

DEFAULT_DAYS = 30
# A chart of more days than this has bars thinner than a pixel.
MAX_CHART_DAYS = 366
DEFAULT_PER_PAGE = 25
MAX_PER_PAGE = 100
MAX_PAGE = 100_000
# A consult writes a few dozen entries a day; this is far beyond a normal one.
TECHNICAL_LOG_LIMIT = 500

FILTER_PARAMS = frozenset({"from", "to", "status", "therapist", "tz"})
LIST_PARAMS = FILTER_PARAMS | {"page", "per_page"}
CHART_PARAMS = FILTER_PARAMS | {"lang"}

_STATUSES = ", ".join(status.value for status in ConsultStatus)


@dataclass(frozen=True)
class Selection:
    """The parsed filters of a request."""

    first_day: date
    last_day: date
    zone: tzinfo
    zone_name: str
    status: ConsultStatus | None
    therapist: str | None

    def consult_filter(self, organisation_id: uuid.UUID) -> support.ConsultFilter:
        return support.ConsultFilter(
            organisation_id=organisation_id,
            since=day_start(self.first_day, self.zone),
            until=day_start(self.last_day + timedelta(days=1), self.zone),
            status=self.status,
            therapist=self.therapist,
        )

    def json(self) -> dict[str, Any]:
        return {
            "from": self.first_day.isoformat(),
            "to": self.last_day.isoformat(),
            "tz": self.zone_name,
            "status": self.status.value if self.status else None,
            "therapist": self.therapist,
        }


def _selection(request: web.Request, params: dict[str, str], *, max_days: int | None) -> Selection:
    zone, zone_name = query_zone(params)
    first, last = query_date(params, "from"), query_date(params, "to")
    today = request.app[CLOCK].now().astimezone(zone).date()
    if last is None:
        last = today
    if first is None:
        first = max(last - timedelta(days=DEFAULT_DAYS - 1), EARLIEST_DAY)
    if first > last:
        raise Unprocessable(f"parameter 'from' ({first}) is after 'to' ({last})")
    if max_days is not None and (last - first).days + 1 > max_days:
        raise Unprocessable(f"parameters 'from' and 'to': a chart spans at most {max_days} days")
    status = None
    if "status" in params:
        try:
            status = ConsultStatus(params["status"])
        except ValueError:
            raise Unprocessable(f"parameter 'status' must be one of {_STATUSES}") from None
    therapist = params.get("therapist")
    if therapist is not None and not support.PSEUDONYM_PATTERN.fullmatch(therapist):
        raise Unprocessable(
            "parameter 'therapist' must be a therapist pseudonym such as T-4F2A91C03B7E"
        )
    return Selection(first, last, zone, zone_name, status, therapist)


def _pseudonyms(request: web.Request) -> support.TherapistPseudonyms:
    return support.TherapistPseudonyms(request.app[MASTER_KEY].key)


async def _consults_json(
    conn: AsyncConnection, found: list[support.SupportConsult], *, now: datetime
) -> list[dict[str, Any]]:
    """The consults as support sees them, each with how it ended (24 hours)."""
    reasons = await support.end_reasons(conn, [consult.id for consult in found], now=now)
    return [
        support_consult_json(consult, end_reason=_end_reason(reasons.get(consult.id)))
        for consult in found
    ]


def _end_reason(logged: str | None) -> str | None:
    # Only the protocol's reasons are shown: the log's detail is free JSON.
    try:
        return EndReason(logged).value if logged is not None else None
    except ValueError:
        return None


@routes.get("/api/support/consults")
async def support_consults(request: web.Request) -> web.Response:
    """One page of the organisation's consults, newest first, with the filters applied."""
    principal = await require_role(request, Role.SUPPORT, action=ACTION_LIST)
    params = query_params(request, LIST_PARAMS)
    selection = _selection(request, params, max_days=None)
    page = query_number(params, "page", default=1, low=1, high=MAX_PAGE)
    per_page = query_number(params, "per_page", default=DEFAULT_PER_PAGE, low=1, high=MAX_PER_PAGE)
    organisation_id = principal.account.organisation_id
    pseudonyms = _pseudonyms(request)
    # The page and its total: each statement sees its own snapshot, on
    # either database, as in a read-committed transaction.
    async with reading(request.app[DB_ENGINE]) as conn:
        found = await support.list_consults(
            conn,
            pseudonyms,
            selection.consult_filter(organisation_id),
            page=page,
            per_page=per_page,
        )
        therapists = await support.therapists(conn, pseudonyms, organisation_id)
        shown = await _consults_json(conn, found.consults, now=request.app[CLOCK].now())
    await record_read(
        request,
        principal,
        action=ACTION_LIST,
        object_type="organisation",
        object_id=organisation_id,
    )
    return web.json_response(
        {
            "consults": shown,
            "page": found.page,
            "per_page": found.per_page,
            "total": found.total,
            "pages": found.pages,
            "filters": selection.json(),
            "therapists": therapists,
        }
    )


def _svg(text: str) -> web.Response:
    return web.Response(text=text, content_type="image/svg+xml", charset="utf-8")


def _lang(params: dict[str, str]) -> str:
    lang = params.get("lang", "en")
    if lang not in LANGUAGES:
        raise Unprocessable(f"parameter 'lang' must be one of {', '.join(LANGUAGES)}")
    return lang


@routes.get("/api/support/charts/consults-per-day.svg")
async def support_chart_per_day(request: web.Request) -> web.Response:
    """A bar per day of the range: how many consults had their moment then."""
    principal = await require_role(request, Role.SUPPORT, action=ACTION_PER_DAY)
    params = query_params(request, CHART_PARAMS)
    selection = _selection(request, params, max_days=MAX_CHART_DAYS)
    lang = _lang(params)
    organisation_id = principal.account.organisation_id
    async with reading(request.app[DB_ENGINE]) as conn:
        days = await support.consults_per_day(
            conn,
            _pseudonyms(request),
            selection.consult_filter(organisation_id),
            first_day=selection.first_day,
            last_day=selection.last_day,
            zone=selection.zone,
        )
    await record_read(
        request,
        principal,
        action=ACTION_PER_DAY,
        object_type="organisation",
        object_id=organisation_id,
    )
    return _svg(consults_per_day_svg(days, lang=lang))


@routes.get("/api/support/charts/durations.svg")
async def support_chart_durations(request: web.Request) -> web.Response:
    """A bar per duration bucket, over the consults of the range that ended."""
    principal = await require_role(request, Role.SUPPORT, action=ACTION_DURATIONS)
    params = query_params(request, CHART_PARAMS)
    selection = _selection(request, params, max_days=MAX_CHART_DAYS)
    lang = _lang(params)
    organisation_id = principal.account.organisation_id
    async with reading(request.app[DB_ENGINE]) as conn:
        found = await support.durations(
            conn, _pseudonyms(request), selection.consult_filter(organisation_id)
        )
    await record_read(
        request,
        principal,
        action=ACTION_DURATIONS,
        object_type="organisation",
        object_id=organisation_id,
    )
    return _svg(
        durations_svg(
            support.duration_histogram(found),
            found,
            first_day=selection.first_day,
            last_day=selection.last_day,
            lang=lang,
        )
    )


@routes.get("/api/support/consults/{consult_id}/technical-log")
async def support_technical_log(request: web.Request) -> web.Response:
    """The consult's technical-log entries of the last 24 hours, newest first.

    A consult of another organisation answers 404, as an unknown one does,
    and the attempt is access-logged as refused.
    """
    principal = await require_role(request, Role.SUPPORT, action=ACTION_TECHNICAL_LOG)
    query_params(request, NO_PARAMS)
    try:
        consult_id: uuid.UUID | None = uuid.UUID(request.match_info["consult_id"])
    except ValueError:
        consult_id = None
    app = request.app
    now = app[CLOCK].now()
    organisation_id = principal.account.organisation_id
    consult: support.SupportConsult | None = None
    entries = []
    async with reading(app[DB_ENGINE]) as conn:
        if consult_id is not None:
            try:
                consult = await support.get_consult(
                    conn, _pseudonyms(request), organisation_id, consult_id
                )
            except NotFound:
                consult = None
        if consult is not None:
            entries = await support.technical_log_of(
                conn, consult.id, now=now, limit=TECHNICAL_LOG_LIMIT
            )
            [shown] = await _consults_json(conn, [consult], now=now)
    await record_read(
        request,
        principal,
        action=ACTION_TECHNICAL_LOG,
        object_type="consult",
        object_id=consult_id,
        outcome=Outcome.ALLOWED if consult is not None else Outcome.REFUSED,
    )
    if consult is None:
        raise NotFoundError("no such consult")
    return web.json_response(
        {
            "consult": shown,
            "since": iso(now - RETENTION),
            "entries": [
                {"at": iso(entry.at), "kind": entry.kind, "detail": dict(entry.detail)}
                for entry in entries
            ],
            "truncated": len(entries) == TECHNICAL_LOG_LIMIT,
        }
    )
