"""Short-lived, single-use tickets that let a patient's WebSocket in.

A ticket is made from a valid invite just before the socket opens; it is
good once and for a minute, so a ticket copied from a log or a proxy is of
no use. The in-process store is for one node; Redis takes over later.
"""

from __future__ import annotations

import secrets
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol


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
        mine = self._by_invite.get(grant.invite_hash)
        if mine is not None and ticket in mine:
            mine.remove(ticket)
        return grant if until > now else None

    def _forget_expired(self, now: datetime) -> None:
        while self._tickets:
            ticket, (grant, until) = next(iter(self._tickets.items()))
            if until > now:
                break
            self._tickets.popitem(last=False)
            mine = self._by_invite.get(grant.invite_hash)
            if mine is not None:
                if ticket in mine:
                    mine.remove(ticket)
                if not mine:
                    del self._by_invite[grant.invite_hash]

    def __len__(self) -> int:
        return len(self._tickets)
