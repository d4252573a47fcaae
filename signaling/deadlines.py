"""The rooms' deadlines: grace periods, the maximum duration, forgetting a room.

Deadlines are kept by :class:`~signaling.ports.Timers` (in process, or in Redis
for all nodes); :class:`RoomDeadlines` acts on those that came due. A timer
whose action fails is tried again a little later; one of a kind this node does
not know is kept for a node that does.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any, Protocol, assert_never

import structlog

from audit.clock import Clock
from signaling.changes import ChangeThenTell
from signaling.ports import RoomStore, StateUnavailable, Timers
from signaling.protocol import (
    EndReason,
    ParticipantRole,
    TimerKind,
    UnknownTimerKind,
    outbound,
)
from signaling.state import RoomPhase

_log = structlog.get_logger("videoconsult.signaling")

# An ended room is kept this long, so that the messages and reconnects of its
# last moments find it over without asking the database; later ones are
# refused by the consult's record (at the door, or when the room is made
# again). An hour held a busy server's memory for nothing (the soak).
ENDED_ROOM_KEPT = timedelta(minutes=2)
# A timer whose action failed (say, the database was away) is tried again.
TIMER_RETRY = timedelta(seconds=5)


class EndConsult(Protocol):
    async def __call__(
        self, consult_id: uuid.UUID, *, reason: EndReason, at: datetime | None = None
    ) -> None: ...


class RoomDeadlines:
    def __init__(
        self,
        *,
        clock: Clock,
        store: RoomStore,
        timers: Timers,
        end: EndConsult,
        change: ChangeThenTell,
    ) -> None:
        self._clock = clock
        self._store = store
        self._timers = timers
        self._end = end
        self._change = change
        # Timers that came due but neither fired nor could be set again.
        self._unsaved: dict[str, dict[str, Any]] = {}

    async def forget_later(self, consult_id: uuid.UUID) -> None:
        """Forget the room once it has been over (or idle) for a while."""
        await self._timers.schedule(
            TimerKind.FORGET.key(consult_id),
            self._clock.now() + ENDED_ROOM_KEPT,
            {"consult": str(consult_id)},
        )

    async def fire_due(self) -> int:
        """Act on every due timer; return how many.

        A timer whose action fails is tried again a little later; the others
        due at the same time go ahead regardless.
        """
        now = self._clock.now()
        for key, payload in list(self._unsaved.items()):
            await self._timers.schedule(key, now, payload)
            del self._unsaved[key]
        due = await self._timers.claim_due(now)
        for key, payload in due:
            try:
                kind = TimerKind.of_key(key)
            except UnknownTimerKind as err:
                # Kept, not dropped: a node that knows the kind may fire it.
                _log.error("room timer of an unknown kind; kept for later", kind=err.kind)
                await self._retry(key, payload, now)
                continue
            try:
                await self._fire(kind, payload)
                try:
                    await self._timers.done(key)
                except StateUnavailable:
                    # Its claim runs out and it fires again: the actions
                    # find their work done and change nothing.
                    _log.warning("room timer done, but Redis did not hear it")
            except StateUnavailable:
                _log.warning("room timer postponed: shared state unavailable")
                await self._retry(key, payload, now)
            except Exception:
                _log.exception("room timer failed; trying again", timer=kind.value)
                await self._retry(key, payload, now)
        return len(due)

    async def _retry(self, key: str, payload: dict[str, Any], now: datetime) -> None:
        try:
            await self._timers.schedule(key, now + TIMER_RETRY, payload)
        except StateUnavailable:
            # Claimed, so nobody else has it: kept here until Redis is back.
            self._unsaved[key] = payload

    async def _fire(self, kind: TimerKind, payload: dict[str, Any]) -> None:
        consult_id = uuid.UUID(payload["consult"])
        if kind is TimerKind.MAX_DURATION:
            await self._end(consult_id, reason=EndReason.MAX_DURATION)
        elif kind is TimerKind.GRACE:
            await self._grace_over(
                consult_id, ParticipantRole(payload["role"]), payload["connection"]
            )
        elif kind is TimerKind.FORGET:
            await self._forget(consult_id)
        else:
            assert_never(kind)

    async def _grace_over(
        self, consult_id: uuid.UUID, role: ParticipantRole, connection_id: str
    ) -> None:
        end_at: datetime | None = None
        async with self._change(consult_id) as (state, tell):
            if state is None or state.phase is RoomPhase.OVER:
                return
            presence = state.presence(role)
            if (
                presence is None
                and state.phase is RoomPhase.ACTIVE
                and state.presence(role.other) is None
            ):
                # Both gone, and yet not over: a node died between this
                # timer's first try and the end it led to. Ended now.
                end_at = self._clock.now()
            elif presence is None or presence.connected or presence.connection_id != connection_id:
                return  # came back in time
            else:
                state.set_presence(role, None)
                tell(role.other, outbound("peer-left", role=role.value))
                if state.presence(role.other) is None:
                    # Both gone past their grace periods: the consult ended when
                    # this one, the last, went away.
                    end_at = presence.left_at or self._clock.now()
        if end_at is not None:
            await self._end(consult_id, reason=EndReason.BOTH_LEFT, at=end_at)

    async def _forget(self, consult_id: uuid.UUID) -> None:
        state = await self._store.peek(consult_id)
        if state is None:
            return
        idle = (
            state.phase is RoomPhase.WAITING and state.therapist is None and state.patient is None
        )
        if state.phase is RoomPhase.OVER or idle:
            await self._store.forget(consult_id)
        else:
            await self.forget_later(consult_id)  # in use: look again later
