"""Typed keys for everything the application object holds.

Declared in one place so that every module agrees on the type behind a key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import ClientSession, web
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.access_writer import AccessLogWriter
from audit.chunk_maps import ChunkMapCache
from audit.clock import Clock
from audit.direct import SingleStatements
from audit.keys import MasterKey
from audit.recordings import FileStore
from audit.technical_log import TechnicalLog
from config import Settings
from server.auth.passwords import PasswordHasher
from signaling.rooms import ConsultRooms
from signaling.tickets import TicketStore

if TYPE_CHECKING:  # they need these keys themselves (through the background jobs)
    from server.client_limits import ClientLimiter
    from server.cluster import Cluster
    from server.metrics import Metrics
    from server.ws.connection import Connection
    from server.ws.outbox import Outbox

SETTINGS = web.AppKey("settings", Settings)
# The absolute data directory, checked and created at start-up.
DATA_DIR = web.AppKey("data_dir", Path)
MASTER_KEY = web.AppKey("master_key", MasterKey)
DB_ENGINE = web.AppKey("db_engine", AsyncEngine)
# A patient's way in, each statement on its own: on PostgreSQL asyncpg's own
# pool and prepared statements (audit/direct.py).
DB_STATEMENTS = web.AppKey("db_statements", SingleStatements)
# Group commit of the access records of reads (audit/access_writer.py).
ACCESS_LOG = web.AppKey("access_log", AccessLogWriter)
# None when no Redis is configured (one node, everything in-process).
REDIS: web.AppKey[Redis | None] = web.AppKey("redis")
# This node's parts of the shared state on Redis; None without Redis.
CLUSTER: web.AppKey[Cluster | None] = web.AppKey("cluster")
# Every open signaling socket, so that shutdown can close them with 1001.
WEBSOCKETS: web.AppKey[set[Connection]] = web.AppKey("websockets")
# The time, for every rule that depends on it; tests put a ManualClock here.
CLOCK = web.AppKey("clock", Clock)
PASSWORD_HASHER = web.AppKey("password_hasher", PasswordHasher)
# The consult rooms (created once the database is open).
ROOMS = web.AppKey("rooms", ConsultRooms)
# Single-use WebSocket tickets for patients.
TICKETS = web.AppKey("tickets", TicketStore)
# Requests a minute per client address where no login is needed.
CLIENT_LIMITER: web.AppKey[ClientLimiter] = web.AppKey("client_limiter")
# Open therapist sockets by the hash of their login session, for the session check.
THERAPIST_SOCKETS: web.AppKey[dict[str, set[Connection]]] = web.AppKey("therapist_sockets")
# Every open signaling socket's outbox, for the heartbeat rounds (server/ws/heartbeat.py).
SOCKET_HEARTBEATS: web.AppKey[set[Outbox]] = web.AppKey("socket_heartbeats")
# The technical log's sink: connection diagnostics, kept 24 hours.
TECHNICAL_LOG = web.AppKey("technical_log", TechnicalLog)
# This node's Prometheus metrics, in a registry of the app's own.
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
# The recordings' encrypted file store, in the data directory.
FILE_STORE = web.AppKey("file_store", FileStore)
# The chunk maps of the recordings played last (bounded), for the player's range requests.
CHUNK_MAPS = web.AppKey("chunk_maps", ChunkMapCache)
# The HTTP client webhooks go out with (server/webhooks.py).
WEBHOOK_HTTP = web.AppKey("webhook_http", ClientSession)
