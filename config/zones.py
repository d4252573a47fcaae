"""IANA time zones by name, as settings, the API and the command line take them."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def known_zone(name: str) -> ZoneInfo:
    """The time zone ``name`` (e.g. Europe/Amsterdam); ValueError when this
    machine knows none by that name. ZoneInfo itself raises one of several
    errors: a name it cannot find, one that is not a path, and a folder of the
    time zone database (``Europe``), which is an OSError."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as err:
        raise ValueError(f"{name!r} is not a time zone this machine knows") from err
