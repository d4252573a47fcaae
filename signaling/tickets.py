"""Short-lived, single-use tickets that let a patient's WebSocket in.

A ticket is made from a valid invite just before the socket opens; it is
good once and for a minute, so a ticket copied from a log or a proxy is of
no use. The in-process store is for one node; Redis takes over later.
"""

from __future__ import annotations

import secrets
import uuid
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


class InProcessTicketStore:
    def __init__(self) -> None:
        self._tickets: dict[str, tuple[TicketGrant, datetime]] = {}

    async def issue(self, grant: TicketGrant, *, now: datetime, ttl_s: int) -> str:
        self._forget_expired(now)
        ticket = secrets.token_urlsafe(32)
        self._tickets[ticket] = (grant, now + timedelta(seconds=ttl_s))
        return ticket

    async def claim(self, ticket: str, *, now: datetime) -> TicketGrant | None:
        entry = self._tickets.pop(ticket, None)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def _forget_expired(self, now: datetime) -> None:
        for ticket in [t for t, (_grant, until) in self._tickets.items() if until <= now]:
            del self._tickets[ticket]
