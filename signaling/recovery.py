"""Rooms put right after a failure: a node that died, Redis that lost its data
or was away while sockets closed.

The shared room state is only as good as what reached it. This node keeps
what it knows for sure (its open connections, and the disconnects Redis could
not take) and tells it again when asked (:meth:`Recovery.reconcile`, run
periodically); a node found dead has its participants dropped out of their
rooms as if their sockets had closed when it was last seen
(:meth:`Recovery.node_lost`).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine

from audit.clock import Clock
from audit.consults import get_consult
from audit.errors import NotFound
from signaling.ports import RoomStore, Timers
from signaling.protocol import EndReason, ParticipantRole, TimerKind, outbound
from signaling.state import Participant, Presence, RoomPhase

if TYPE_CHECKING:
    from signaling.rooms import ConsultRooms


class Recovery:
    def __init__(
        self,
        rooms: ConsultRooms,
        *,
        engine: AsyncEngine,
        clock: Clock,
        store: RoomStore,
        timers: Timers,
        max_duration_s: int,
    ) -> None:
        self._rooms = rooms
        self._engine = engine
        self._clock = clock
        self._store = store
        self._timers = timers
        self._max_duration = timedelta(seconds=max_duration_s)
        # Disconnects the shared state could not take (Redis away), with
        # when they happened: told again by ``reconcile``.
        self._missed_leaves: dict[str, tuple[Participant, datetime]] = {}

    def missed_leave(self, participant: Participant) -> None:
        """The shared state could not take this participant's disconnect: told later."""
        self._missed_leaves[participant.connection_id] = (participant, self._clock.now())

    async def node_lost(self, consult_id: uuid.UUID, node: str, *, last_seen: datetime) -> int:
        """Another node died: its participants in this room drop out as if
        their sockets had closed at ``last_seen`` (grace periods start, the
        others are told). Returns how many participants it held here."""
        state = await self._store.peek(consult_id)
        if state is None or state.phase is RoomPhase.OVER:
            return 0
        lost = 0
        for role in ParticipantRole:
            presence = state.presence(role)
            if presence is not None and presence.connected and presence.node == node:
                lost += 1
                await self._rooms.leave(
                    Participant(consult_id, role, presence.connection_id),
                    grace=True,
                    left_at=last_seen,
                )
        if lost:
            # A recording runs on its participants' node: it died with it.
            await self._rooms.recording.node_lost(consult_id, now=self._clock.now())
        return lost

    async def reconcile(self) -> int:
        """Tell the shared state again what this node knows: the disconnects
        it could not record, and every connection open here (after Redis
        lost its data, or this node was taken for dead). Returns how many
        rooms were repaired.

        Raises :class:`~signaling.ports.StateUnavailable` while Redis is
        still away; what is left is tried again next time.
        """
        for connection_id, (participant, at) in list(self._missed_leaves.items()):
            await self._rooms.leave(participant, grace=True, left_at=at)
            del self._missed_leaves[connection_id]
        repaired = 0
        for participant in self._rooms.connected_here:
            if await self._reassert(participant):
                repaired += 1
        return repaired

    async def _reassert(self, participant: Participant) -> bool:
        """Put this node's connection back into its room if the room lost it."""
        consult_id, role, other = participant.consult_id, participant.role, participant.role.other
        try:
            async with self._engine.connect() as conn:
                consult = await get_consult(conn, consult_id)
        except NotFound:
            return False
        if consult.is_over:
            await self._rooms.end(consult_id, reason=EndReason.CONSULT_OVER)
            return True
        send = self._rooms.send
        async with self._store.locked(consult_id, create=True) as state:
            assert state is not None
            if state.phase is RoomPhase.OVER or not self._rooms.is_here(participant):
                return False
            presence = state.presence(role)
            if presence is not None and presence.connection_id != participant.connection_id:
                return False  # replaced by a newer connection, elsewhere
            if (
                presence is not None
                and presence.connected
                and (state.phase is RoomPhase.ACTIVE or consult.started_at is None)
            ):
                return False  # nothing lost
            state.set_presence(role, Presence(participant.connection_id, node=self._rooms.node_id))
            await self._timers.cancel(TimerKind.GRACE.key(consult_id, role))
            if consult.started_at is not None and state.phase is RoomPhase.WAITING:
                # The room was lost with Redis's data: the record says it runs.
                state.phase = RoomPhase.ACTIVE
                await self._timers.schedule(
                    TimerKind.MAX_DURATION.key(consult_id),
                    consult.started_at + self._max_duration,
                    {"consult": str(consult_id)},
                )
            if state.phase is RoomPhase.ACTIVE and state.present(other):
                # The other may have been told this one left (its node taken
                # for dead); an offer more is harmless either way.
                await send(consult_id, other, outbound("peer-rejoined", role=role.value))
            elif state.phase is RoomPhase.WAITING and role is ParticipantRole.PATIENT:
                await send(
                    consult_id, other, outbound("patient-waiting", display_name=state.display_name)
                )
        return True
