"""The aiohttp application: app factory, HTTP routes and the command line.

Exports :func:`create_app`. Nothing else imports this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the command line imports this package too, and
    # most of its commands need neither the web app nor aiortc (a second of
    # imports on every run).
    if name == "create_app":
        from server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
