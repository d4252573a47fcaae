"""The application factory."""

from __future__ import annotations

from aiohttp import web

from config import Settings
from server import health
from server.app_keys import SETTINGS, WEBSOCKETS
from server.resources import data_dir_context, database_context, redis_context
from server.websockets import close_websockets


def create_app(settings: Settings) -> web.Application:
    """Build the aiohttp application for ``settings``; nothing starts until it runs."""
    app = web.Application()
    app[SETTINGS] = settings
    app[WEBSOCKETS] = set()
    setup_resources(app)
    setup_routes(app)
    return app


def setup_resources(app: web.Application) -> None:
    """Register resources in start order; they are torn down in reverse."""
    app.cleanup_ctx.extend([data_dir_context, database_context, redis_context])
    # Sockets close first, while the database is still there for their last writes.
    app.on_shutdown.append(close_websockets)


def setup_routes(app: web.Application) -> None:
    """Attach every route of the application."""
    app.router.add_routes(health.routes)
