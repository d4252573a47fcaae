"""The Redis client's errors, as the ports' :class:`StateUnavailable`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis.exceptions import RedisError

from signaling.ports import StateUnavailable

__all__ = ["UNREACHABLE", "unavailable_on_error"]

# What the client raises when Redis cannot be reached or did not answer.
UNREACHABLE = (RedisError, OSError)


@contextlib.contextmanager
def unavailable_on_error(what: str) -> Iterator[None]:
    """Turn the client's errors into :class:`StateUnavailable`, naming ``what`` failed."""
    try:
        yield
    except UNREACHABLE as err:
        raise StateUnavailable(f"Redis is unreachable ({what}): {type(err).__name__}") from err
