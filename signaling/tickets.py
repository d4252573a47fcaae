"""Short-lived, single-use tickets that let a patient's WebSocket in.

A ticket is made from a valid invite just before the socket opens; it is
good once and for a minute, so a ticket copied from a log or a proxy is of
no use. An invite has at most :data:`MAX_TICKETS_PER_INVITE` live tickets;
asking for another drops its oldest.

:class:`InProcessTicketStore` is for one node. :class:`RedisTicketStore`
keeps them in Redis for several nodes: a ticket issued on one node is
claimed, once, on any of them. Redis holds only the ticket's SHA-256,
never the ticket (a bearer secret). Errors of the Redis client are not
translated here: the callers answer them with 503 (``unavailable``).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog
from redis.asyncio import Redis

__all__ = [
    "MAX_TICKETS_PER_INVITE",
    "InProcessTicketStore",
    "RedisTicketStore",
    "TicketGrant",
    "TicketStore",
]

_log = structlog.get_logger("videoconsult.signaling")


@dataclass(frozen=True)
class TicketGrant:
    consult_id: uuid.UUID
    # The invite's hash, checked again when the ticket is used.
    invite_hash: str


class TicketStore(Protocol):
    async def issue(self, grant: TicketGrant, *, now: datetime, ttl_s: int) -> str:
        """Return a new ticket for ``grant``."""

    async def claim(self, ticket: str, *, now: datetime) -> TicketGrant | None:
        """Return the grant and forget the ticket; None if unknown, used or expired."""


# Live tickets per invite; asking for more drops the oldest. Enough for a
# patient retrying on a bad network, too few to fill the server's memory.
MAX_TICKETS_PER_INVITE = 5


class InProcessTicketStore:
    def __init__(self) -> None:
        # In issue order, so expired ones are at the front (one fixed TTL).
        self._tickets: OrderedDict[str, tuple[TicketGrant, datetime]] = OrderedDict()
        self._by_invite: dict[str, deque[str]] = {}

    async def issue(self, grant: TicketGrant, *, now: datetime, ttl_s: int) -> str:
        self._forget_expired(now)
        mine = self._by_invite.setdefault(grant.invite_hash, deque())
        while len(mine) >= MAX_TICKETS_PER_INVITE:
            self._tickets.pop(mine.popleft(), None)
        ticket = secrets.token_urlsafe(32)
        self._tickets[ticket] = (grant, now + timedelta(seconds=ttl_s))
        mine.append(ticket)
        return ticket

    async def claim(self, ticket: str, *, now: datetime) -> TicketGrant | None:
        entry = self._tickets.pop(ticket, None)
        if entry is None:
            return None
        grant, until = entry
        self._unlist(ticket, grant)
        return grant if until > now else None

    def _forget_expired(self, now: datetime) -> None:
        while self._tickets:
            ticket, (grant, until) = next(iter(self._tickets.items()))
            if until > now:
                break
            self._tickets.popitem(last=False)
            self._unlist(ticket, grant)

    def _unlist(self, ticket: str, grant: TicketGrant) -> None:
        """Take a ticket that is gone off its invite's list."""
        mine = self._by_invite.get(grant.invite_hash)
        if mine is not None:
            if ticket in mine:
                mine.remove(ticket)
            if not mine:
                # Its last live ticket: the invite is forgotten too, or every
                # invite ever used would leave its empty entry behind.
                del self._by_invite[grant.invite_hash]

    def __len__(self) -> int:
        return len(self._tickets)

    @property
    def invites(self) -> int:
        """Invites with a live ticket here."""
        return len(self._by_invite)


# KEYS: the invite's list of ticket keys (oldest first), the new ticket's
# key. ARGV: the grant (JSON), the TTL in ms, the most live tickets per
# invite. One script, so that two nodes issuing for one invite at once
# cannot both leave it over the limit.
#
# Entries whose ticket is gone (claimed, or expired) are dropped first, so
# that only live tickets count, as in the in-process store; the list then
# never holds more than the limit, which bounds that loop. The ticket keys
# named in the list are not in KEYS: fine on one Redis server, not on a
# Redis Cluster (which this service does not use). The list lives as long
# as its longest-lived ticket.
_ISSUE = """
for _, key in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', key) == 0 then
    redis.call('LREM', KEYS[1], 0, key)
  end
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('RPUSH', KEYS[1], KEYS[2])
while redis.call('LLEN', KEYS[1]) > tonumber(ARGV[3]) do
  redis.call('DEL', redis.call('LPOP', KEYS[1]))
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""


class RedisTicketStore:
    """Tickets in Redis, for several nodes.

    A ticket's grant is JSON (consult, invite hash, valid-until) at
    ``{prefix}:ticket:{SHA-256 of the ticket, hex}``, expiring with the
    ticket; an invite's live tickets are the list
    ``{prefix}:ticket-invite:{invite hash}``. A claim is ``GETDEL``
    (Redis 6.2 or later): of two nodes claiming one ticket at once, one
    gets it. The valid-until is checked against ``now`` as well, so the
    store follows the application's clock, not only Redis's.

    Errors of the client (:class:`redis.RedisError`: Redis unreachable,
    timed out) are raised as they are; callers answer them with 503.
    """

    def __init__(self, client: Redis, *, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._issue = client.register_script(_ISSUE)

    def _key(self, ticket: str) -> str:
        digest = hashlib.sha256(ticket.encode()).hexdigest()
        return f"{self._prefix}:ticket:{digest}"

    async def issue(self, grant: TicketGrant, *, now: datetime, ttl_s: int) -> str:
        if ttl_s <= 0:
            raise ValueError(f"a ticket must live a while, not ttl_s={ttl_s}")
        ticket = secrets.token_urlsafe(32)
        value = json.dumps(
            {
                "consult": str(grant.consult_id),
                "invite": grant.invite_hash,
                "until": (now + timedelta(seconds=ttl_s)).isoformat(),
            },
            separators=(",", ":"),
        )
        await self._issue(
            keys=[f"{self._prefix}:ticket-invite:{grant.invite_hash}", self._key(ticket)],
            args=[value, ttl_s * 1000, MAX_TICKETS_PER_INVITE],
        )
        return ticket

    async def claim(self, ticket: str, *, now: datetime) -> TicketGrant | None:
        raw: bytes | str | None = await self._client.getdel(self._key(ticket))
        if raw is None:
            return None
        entry = _decode_entry(raw)
        if entry is None:
            return None
        grant, until = entry
        return grant if until > now else None


def _decode_entry(raw: bytes | str) -> tuple[TicketGrant, datetime] | None:
    """The grant and valid-until of a stored ticket; None (logged) if unreadable.

    Only this module writes these entries; anything else found there is
    refused rather than trusted, and logged by its kind only (neither the
    value nor the key: the key would let a reader of the log match it to
    a ticket seen elsewhere).
    """
    try:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise TypeError(f"a JSON {type(value).__name__}, not an object")
        consult, invite, until = value["consult"], value["invite"], value["until"]
        if not (isinstance(consult, str) and isinstance(invite, str) and isinstance(until, str)):
            raise TypeError("a field that is not a string")
        if not invite:
            raise ValueError("an empty invite hash")
        valid_until = datetime.fromisoformat(until)
        if valid_until.tzinfo is None:
            raise ValueError("a valid-until without a time zone")
        return TicketGrant(uuid.UUID(consult), invite), valid_until
    except (ValueError, KeyError, TypeError) as err:
        _log.warning("unreadable ticket entry in Redis refused", error=type(err).__name__)
        return None
