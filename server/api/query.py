"""Query parameters of the JSON API's read routes, checked strictly.

An unknown, repeated or malformed parameter answers 422 ``invalid_field``
naming it. Days are given as YYYY-MM-DD in the time zone ``tz`` (an IANA
name, default UTC). Used by the support view and the admin console.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime, time, tzinfo

from aiohttp import web

from config.zones import known_zone
from server.api.errors import Unprocessable

__all__ = [
    "EARLIEST_DAY",
    "LATEST_DAY",
    "NO_PARAMS",
    "day_start",
    "query_date",
    "query_number",
    "query_params",
    "query_uuid",
    "query_zone",
]

# Dates outside this range are typing errors, and their day boundaries overflow.
EARLIEST_DAY, LATEST_DAY = date(2000, 1, 1), date(2999, 12, 31)

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_NUMBER = re.compile(r"[0-9]{1,6}")
# IANA names ("Europe/Amsterdam", "Etc/GMT+1"): no dots, so never a path upwards.
_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+){0,2}")


# A read route that takes no parameter at all.
NO_PARAMS: frozenset[str] = frozenset()


def day_start(day: date, zone: tzinfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def query_params(request: web.Request, allowed: frozenset[str]) -> dict[str, str]:
    """The query's parameters, each at most once and each one we know."""
    query = request.rel_url.query
    unknown = sorted(set(query) - allowed)
    if unknown:
        expected = ", ".join(sorted(allowed)) or "none"
        raise Unprocessable(f"unknown parameter '{unknown[0][:40]}' (expected: {expected})")
    for name in query:
        if len(query.getall(name)) > 1:
            raise Unprocessable(f"parameter '{name}' is given more than once")
    return {name: query[name] for name in query}


def query_date(params: dict[str, str], name: str) -> date | None:
    text = params.get(name)
    if text is None:
        return None
    try:
        if not _DATE.fullmatch(text):
            raise ValueError(text)
        day = date.fromisoformat(text)
    except ValueError:
        raise Unprocessable(
            f"parameter '{name}' must be a date as YYYY-MM-DD, e.g. 2026-11-23"
        ) from None
    if not EARLIEST_DAY <= day <= LATEST_DAY:
        raise Unprocessable(f"parameter '{name}' must lie between {EARLIEST_DAY} and {LATEST_DAY}")
    return day


def query_zone(params: dict[str, str]) -> tuple[tzinfo, str]:
    name = params.get("tz", "UTC")
    if name == "UTC":
        return UTC, name
    problem = (
        "parameter 'tz' must be an IANA time zone such as Europe/Amsterdam "
        "that this server knows, or UTC"
    )
    if len(name) > 64 or not _ZONE.fullmatch(name):
        raise Unprocessable(problem)
    try:
        return known_zone(name), name
    except ValueError:
        raise Unprocessable(problem) from None


def query_uuid(params: dict[str, str], name: str, *, what: str) -> uuid.UUID | None:
    """The id in parameter ``name`` (any spelling :class:`uuid.UUID` reads), or
    None when it is not given; ``what`` says whose id, for the error."""
    text = params.get(name)
    if text is None:
        return None
    try:
        # The longest spelling, "urn:uuid:" and 36 characters, is 45.
        if len(text) > 45:
            raise ValueError(text)
        return uuid.UUID(text)
    except ValueError:
        raise Unprocessable(f"parameter '{name}' must be {what} (a UUID)") from None


def query_number(params: dict[str, str], name: str, *, default: int, low: int, high: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    if not _NUMBER.fullmatch(text) or not low <= int(text) <= high:
        raise Unprocessable(f"parameter '{name}' must be a whole number from {low} to {high}")
    return int(text)
