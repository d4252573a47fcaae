"""Rooms put right after a failure: a node that died, Redis that lost its data
or was away while sockets closed.

The shared room state is only as good as what reached it. This node keeps
what it knows for sure (its open connections, and the disconnects Redis could
not take) and tells it again when asked (:meth:`Recovery.reconcile`, run
periodically); a node found dead has its participants dropped out of their
rooms as if their sockets had closed when it was last seen
(:meth:`Recovery.node_lost`). A server that starts after a crash finds the
consults that were running without their rooms: each resumes as running, its
participants in their grace periods from when the server was last alive
(:meth:`Recovery.resume`), so they come back to it, or it ends.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine

from audit.clock import Clock
from audit.consults import Consult, get_consult_and_label
from audit.direct import OnConnection
from audit.errors import NotFound
from audit.labels import SealedLabel
from signaling.changes import ChangeThenTell
from signaling.concurrency import each_at_most
from signaling.ports import RoomStore, Timers
from signaling.protocol import EndReason, ParticipantRole, TimerKind, outbound
from signaling.state import Link, Participant, Presence, RoomPhase, RoomState

if TYPE_CHECKING:
    from signaling.rooms import ConsultRooms

# Rooms repaired at once after a loss (``reconcile``, ``resume``, a dead
# node's rooms): their database reads and Redis round trips overlap instead of
# following one another, and the database pool and Redis keep
# room for the consults going on meanwhile.
REPAIR_CONCURRENCY = 8

# The connection id of a participant whose socket was lost with a server
# that died: any real connection of theirs replaces it.
LOST_CONNECTION = "lost-with-the-server"


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
        grace_s: int,
    ) -> None:
        self._rooms = rooms
        self._engine = engine
        self._clock = clock
        self._store = store
        self._change = ChangeThenTell(store, rooms.send)
        self._timers = timers
        self._max_duration = timedelta(seconds=max_duration_s)
        self._grace = timedelta(seconds=grace_s)
        # Disconnects the shared state could not take (Redis away), with
        # when they happened: told again by ``reconcile``.
        self._missed_leaves: dict[str, tuple[Participant, datetime]] = {}
        # Ends recorded in the database that the shared state could not take
        # (their rooms still run): told again by ``reconcile``.
        self._missed_ends: dict[uuid.UUID, tuple[EndReason, datetime]] = {}

    @property
    def due(self) -> bool:
        """Whether something the shared state could not take waits for
        ``reconcile`` (Redis was away for a moment that no heartbeat met)."""
        return bool(self._missed_leaves or self._missed_ends)

    def missed_leave(self, participant: Participant) -> None:
        """The shared state could not take this participant's disconnect: told later."""
        self._missed_leaves[participant.connection_id] = (participant, self._clock.now())

    def missed_end(self, consult_id: uuid.UUID, reason: EndReason, at: datetime) -> None:
        """The consult's end is recorded, but its room could not be told: told
        later, with the first reason and time."""
        self._missed_ends.setdefault(consult_id, (reason, at))

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
        connections were put back into their rooms.

        The rooms are repaired ``REPAIR_CONCURRENCY`` at a time, each
        consult's record read once for both its participants: the rooms'
        reads and Redis round trips overlap instead of following one another.

        Raises :class:`~signaling.ports.StateUnavailable` while Redis is
        still away; what is left is tried again next time.
        """
        for connection_id, (participant, at) in list(self._missed_leaves.items()):
            await self._rooms.leave(participant, grace=True, left_at=at)
            del self._missed_leaves[connection_id]
        for consult_id, (reason, ended_at) in list(self._missed_ends.items()):
            # The record keeps the end it was given (mark_ended changes no end);
            # a room saved as over before Redis went is told all the same.
            await self._rooms.end(consult_id, reason=reason, at=ended_at, again=True)
            del self._missed_ends[consult_id]
        by_consult: dict[uuid.UUID, list[Participant]] = {}
        for participant in self._rooms.connected_here:
            by_consult.setdefault(participant.consult_id, []).append(participant)
        repaired = await each_at_most(REPAIR_CONCURRENCY, by_consult.values(), self._reassert_room)
        return sum(repaired)

    async def resume(
        self, running: list[tuple[uuid.UUID, datetime]], *, last_seen: datetime
    ) -> int:
        """After a start: every consult the record says is running, whose room
        is lost (the server died with it, or Redis lost its data), runs again
        with both participants in their grace periods, as if their sockets had
        closed at ``last_seen``. Whoever comes back finds it running; when
        nobody does, it ends at ``last_seen``. Returns how many resumed."""

        async def resume_one(consult: tuple[uuid.UUID, datetime]) -> bool:
            consult_id, started_at = consult
            async with self._store.locked(consult_id, create=True) as state:
                assert state is not None
                if state.phase is not RoomPhase.WAITING or state.therapist or state.patient:
                    return False  # the room is known (kept by Redis): nothing lost
                await self.running_again(consult_id, state, started_at)
                for role in ParticipantRole:
                    state.set_presence(
                        role,
                        Presence(LOST_CONNECTION, link=Link.RECONNECTING, left_at=last_seen),
                    )
                    await self._timers.schedule(
                        TimerKind.GRACE.key(consult_id, role),
                        self._clock.now() + self._grace,
                        {
                            "consult": str(consult_id),
                            "role": role.value,
                            "connection": LOST_CONNECTION,
                        },
                    )
            return True

        return sum(await each_at_most(REPAIR_CONCURRENCY, running, resume_one))

    async def running_again(
        self, consult_id: uuid.UUID, state: RoomState, started_at: datetime
    ) -> None:
        """The room lost its state, but the record says the consult runs: it
        runs again, to its maximum duration from its real start."""
        state.phase = RoomPhase.ACTIVE
        await self._timers.schedule(
            TimerKind.MAX_DURATION.key(consult_id),
            started_at + self._max_duration,
            {"consult": str(consult_id)},
        )

    async def _reassert_room(self, participants: list[Participant]) -> int:
        """Put this node's connections to one consult back into its room if
        the room lost them; return how many were put back. The therapist
        goes first, so that a waiting patient's return tells them the label."""
        consult_id = participants[0].consult_id
        try:
            async with self._engine.connect() as conn:
                consult, label = await get_consult_and_label(OnConnection(conn), consult_id)
        except NotFound:
            return 0
        if consult.is_over:
            # Its sockets here are told, also when the room was saved as over
            # by an end that Redis cut short on a node that is gone since.
            await self._rooms.end(consult_id, reason=EndReason.CONSULT_OVER, again=True)
            return len(participants)
        repaired = 0
        for participant in sorted(participants, key=lambda p: p.role is ParticipantRole.PATIENT):
            if await self._reassert(participant, consult, label):
                repaired += 1
        return repaired

    async def _reassert(
        self, participant: Participant, consult: Consult, label: SealedLabel | None
    ) -> bool:
        """Put this node's connection back into its room if the room lost it."""
        consult_id, role, other = participant.consult_id, participant.role, participant.role.other
        async with self._change(consult_id, create=True) as (state, tell):
            assert state is not None
            if state.phase is RoomPhase.OVER or not self._rooms.is_here(participant):
                return False
            presence = state.presence(role)
            if presence is not None and presence.connection_id not in (
                participant.connection_id,
                LOST_CONNECTION,
            ):
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
                await self.running_again(consult_id, state, consult.started_at)
            if state.phase is RoomPhase.ACTIVE and state.present(other):
                # The other may have been told this one left (its node taken
                # for dead); an offer more is harmless either way.
                tell(other, outbound("peer-rejoined", role=role.value))
            elif state.phase is RoomPhase.WAITING and role is ParticipantRole.PATIENT:
                shown = label if state.present(other) else None
                tell(other, await self._rooms.labels.patient_waiting(shown))
        return True
