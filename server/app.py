"""The application factory."""

from __future__ import annotations

from aiohttp import web

from audit.clock import Clock, SystemClock
from config import Settings
from server import health, pages
from server.api import (
    admin_access_log,
    admin_billing,
    admin_settings,
    admin_views,
    admin_webhooks,
    auth_views,
    consult_views,
    privacy_views,
    receipt_views,
    recording_playback,
    recording_views,
    support_views,
)
from server.api.errors import error_middleware
from server.app_keys import (
    CLOCK,
    METRICS,
    PASSWORD_HASHER,
    SETTINGS,
    SOCKET_HEARTBEATS,
    THERAPIST_SOCKETS,
    WEBSOCKETS,
)
from server.auth.passwords import PasswordHasher
from server.background import periodic
from server.client_limits import client_limit_middleware, client_limits_context
from server.jobs import JOBS
from server.loop_lag import loop_lag_context
from server.metrics import Metrics
from server.outage import DB_OUTAGE, DatabaseOutage
from server.resources import (
    data_dir_context,
    database_context,
    redis_context,
    signaling_context,
    stop_recordings,
    technical_log_context,
)
from server.web_security import add_security_headers, origin_check_middleware
from server.webhooks import webhook_client_context
from server.ws import endpoint as ws_endpoint
from server.ws.registry import close_websockets


def create_app(settings: Settings, *, clock: Clock | None = None) -> web.Application:
    """Build the aiohttp application for ``settings``; nothing starts until it runs.

    ``clock`` is for tests; the service runs on the system clock.
    """
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        # The error middleware is outermost, so even a refused Origin answers in JSON.
        middlewares=[error_middleware, client_limit_middleware, origin_check_middleware],
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock or SystemClock()
    app[PASSWORD_HASHER] = PasswordHasher(settings.accounts)
    app[WEBSOCKETS] = set()
    app[DB_OUTAGE] = DatabaseOutage()
    app.on_cleanup.append(app[DB_OUTAGE].close)
    app[THERAPIST_SOCKETS] = {}
    app[SOCKET_HEARTBEATS] = set()
    # Counted whether or not /metrics is served: the edge never asks.
    app[METRICS] = Metrics()
    app.on_response_prepare.append(add_security_headers)
    setup_resources(app)
    setup_routes(app)
    return app


def setup_resources(app: web.Application) -> None:
    """Register resources in start order; they are torn down in reverse."""
    app.cleanup_ctx.extend(
        [
            # First, so that it watches every other start and stop too.
            loop_lag_context,
            data_dir_context,
            database_context,
            technical_log_context,
            redis_context,
            client_limits_context,
            signaling_context,
            webhook_client_context,
            # After everything they use, so that they stop first.
            *(periodic(job) for job in JOBS),
        ]
    )
    # Recordings are finished first (their end is not a participant leaving),
    # then sockets close, while the database is still there for their last writes.
    app.on_shutdown.append(stop_recordings)
    app.on_shutdown.append(close_websockets)


def setup_routes(app: web.Application) -> None:
    """Attach every route of the application."""
    app.router.add_routes(health.routes)
    if app[SETTINGS].metrics.enabled:
        app.router.add_routes(health.metrics_routes)
    app.router.add_routes(pages.routes)
    pages.setup_static(app)
    app.router.add_routes(auth_views.routes)
    app.router.add_routes(admin_views.routes)
    app.router.add_routes(admin_access_log.routes)
    app.router.add_routes(admin_billing.routes)
    app.router.add_routes(admin_settings.routes)
    app.router.add_routes(admin_webhooks.routes)
    app.router.add_routes(consult_views.routes)
    app.router.add_routes(recording_views.routes)
    app.router.add_routes(recording_playback.routes)
    app.router.add_routes(privacy_views.routes)
    app.router.add_routes(receipt_views.routes)
    app.router.add_routes(support_views.routes)
    app.router.add_routes(ws_endpoint.routes)
