"""Consult rooms: the waiting room, admission, relay, reconnects, the end.

:class:`ConsultRooms` is told about connections (``connect``,
``disconnect``) and their messages (``handle``) by the WebSocket edge, which
has already authenticated them. Replies to the sender come back as return
values; everything for the other participant goes through the
:class:`~signaling.ports.Broker`, so the two may be connected to different
server nodes. Deadlines go through :class:`~signaling.ports.Timers`.

The therapist's client is always the one that makes offers: after an
admission (``peer-joined``), after the patient comes back
(``peer-rejoined``), and after its own reconnect when ``welcome`` says the
patient is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from audit.clock import Clock
from audit.consults import get_consult_and_label, mark_ended, start_consult
from audit.db import is_busy, is_outage
from audit.direct import SingleStatements
from audit.labels import SealedLabel
from audit.recordings import StopReason
from audit.technical_log import DropReason, TechnicalLog
from signaling.changes import Changes, ChangeThenTell
from signaling.deadlines import RoomDeadlines
from signaling.ports import (
    Broker,
    Deliver,
    DeliverNow,
    Delivery,
    RoomStore,
    StateUnavailable,
    Subscription,
    Timers,
)
from signaling.protocol import (
    PATIENT_ONLY,
    RELAYED,
    THERAPIST_ONLY,
    Admit,
    Bye,
    CloseCode,
    Deny,
    End,
    EndReason,
    ErrorCode,
    InboundMessage,
    ParticipantRole,
    Ping,
    ProtocolError,
    RecordConsent,
    RecorderOffer,
    RecordRequest,
    RecordStop,
    Report,
    TimerKind,
    names_consult,
    outbound,
    presence_message,
)
from signaling.recording import RecordingControl, RecordingServices
from signaling.recovery import Recovery
from signaling.relay import Relay, Route
from signaling.report_quota import ReportQuota, Verdict
from signaling.state import Link, Participant, Presence, RoomPhase, RoomState
from signaling.waiting_label import WaitingLabels

__all__ = ["ConsultRooms", "Participant", "RoomClosed", "RoomSettings"]

_log = structlog.get_logger("videoconsult.signaling")


class RoomClosed(Exception):
    """The consult is over: the connection gets ``consult-ended`` and closes."""


@dataclass(frozen=True)
class RoomSettings:
    grace_s: int
    max_duration_s: int
    heartbeat_s: float


class ConsultRooms:
    def __init__(
        self,
        *,
        statements: SingleStatements,
        clock: Clock,
        broker: Broker,
        store: RoomStore,
        timers: Timers,
        settings: RoomSettings,
        technical: TechnicalLog,
        labels: WaitingLabels,
        recording: RecordingServices | None = None,
        node_id: str = "",
        receipt_key: Callable[[uuid.UUID], str],
    ) -> None:
        # What the admitted patient's page asks for its receipt with: theirs only.
        self._receipt_key = receipt_key
        # A patient's way in: its statements each on their own (audit.direct).
        self._statements = statements
        self._engine = engine = statements.engine
        # patient-waiting, with the therapist's label read (and recorded) when shown.
        self.labels = labels
        # This server node, in each presence it records ("" for one node).
        self.node_id = node_id
        # The connections open on this node, by connection id.
        self._here: dict[str, Participant] = {}
        self._changes = Changes(expected=(ProtocolError, RoomClosed, StateUnavailable))
        self.reports = ReportQuota()
        self._clock = clock
        self._broker = broker
        self._store = store
        # Offers, answers and candidates to the other participant.
        self._relay = Relay(store, broker)
        # A change's messages go out once it is saved (see signaling.changes).
        self._change = ChangeThenTell(store, self.send)
        self._timers = timers
        self._settings = settings
        self._technical = technical
        self.recording = RecordingControl(
            services=recording,
            engine=engine,
            clock=clock,
            store=store,
            send=self.send,
            technical=technical,
        )
        self.deadlines = RoomDeadlines(
            clock=clock, store=store, timers=timers, end=self.end, change=self._change
        )
        self.recovery = Recovery(
            self,
            engine=engine,
            clock=clock,
            store=store,
            timers=timers,
            max_duration_s=settings.max_duration_s,
            grace_s=settings.grace_s,
        )

    async def prepare(self, consult_id: uuid.UUID, *, until: datetime) -> None:
        """Open the room of a new consult, forgotten after ``until`` (the invite's
        expiry) unless in use. The therapist's label never enters a room
        (nor Redis): :attr:`labels` unseals it from its row when it is shown."""
        async with self._store.locked(consult_id, create=True) as state:
            assert state is not None
            state.keep_until = until
        await self._timers.schedule(
            TimerKind.FORGET.key(consult_id), until, {"consult": str(consult_id)}
        )

    async def connect(
        self,
        participant: Participant,
        *,
        ice_servers: list[dict[str, Any]],
        deliver: Deliver,
        deliver_now: DeliverNow | None = None,
    ) -> tuple[list[dict[str, Any]], Subscription]:
        """Join the room; return the first messages for this connection and its subscription,
        through which ``deliver`` receives what is sent to this participant
        (``deliver_now``, where given, receives relays sent by :meth:`relay_route`'s route).
        Raises :class:`RoomClosed` when the consult is already over."""
        # Subscribe before anything is announced, so no reply can be missed.
        subscription = await self._broker.subscribe(
            participant.consult_id, participant.role, deliver, deliver_now=deliver_now
        )
        joining = self._changes.start(self._join(participant, ice_servers))
        try:
            to_self, replaced = await asyncio.shield(joining)
        except BaseException:
            await subscription.close()
            if not joining.done():
                # The socket went while it joined: once in, it leaves, as
                # any socket that goes does.
                self._changes.start(self._leave_once_joined(joining, participant))
            raise
        self._here[participant.connection_id] = participant
        self._note(participant, "signaling.connected")
        if replaced and self.recording.is_active(participant.consult_id):
            # The page that was recording is gone (another device took over,
            # or it dropped unnoticed): as with any leave, the recording stops.
            await self._stop_recording(participant.consult_id, StopReason.PARTICIPANT_LEFT)
        return to_self, subscription

    async def _join(
        self, participant: Participant, ice_servers: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], bool]:
        """The first messages for the new connection, and whether it replaced
        a live connection of the same participant."""
        consult_id, role, other = participant.consult_id, participant.role, participant.role.other
        label: SealedLabel | None = None
        async with self._change(consult_id, create=True) as (state, tell):
            assert state is not None
            if state.phase is RoomPhase.WAITING:
                # Before admission, or a room that lost its state (Redis lost
                # its data): the record says which, and brings the label.
                async with self._statements.reading() as db:
                    consult, label = await get_consult_and_label(db, consult_id)
                if consult.is_over:
                    # A room made again for an ended consult: kept as over,
                    # and forgotten as every ended room is.
                    state.phase = RoomPhase.OVER
                    await self.deadlines.forget_later(consult_id)
                elif consult.started_at is not None:
                    await self.recovery.running_again(consult_id, state, consult.started_at)
            to_self: list[dict[str, Any]] = []  # none: the consult is over
            replaced = False
            if state.phase is not RoomPhase.OVER:
                previous = state.presence(role)
                replaced = previous is not None and previous.connected
                if previous is not None and previous.connected:
                    # The same participant on a second device: the newer one wins.
                    tell(
                        role,
                        outbound("replaced"),
                        connection_id=previous.connection_id,
                        close_code=CloseCode.REPLACED,
                    )
                state.set_presence(role, Presence(participant.connection_id, node=self.node_id))
                await self._timers.cancel(TimerKind.GRACE.key(consult_id, role))
                if state.phase is RoomPhase.WAITING and role is ParticipantRole.PATIENT:
                    # The label only for a therapist there to be shown it.
                    shown = label if state.present(other) else None
                    tell(other, await self.labels.patient_waiting(shown))
                elif state.phase is RoomPhase.ACTIVE and state.present(other):
                    # Back after a drop, a reload, the grace period or a bye: the
                    # therapist makes a new offer either way.
                    tell(other, outbound("peer-rejoined", role=role.value))
                elif state.phase is RoomPhase.WAITING and not replaced and state.present(other):
                    # The waiting patient learns that the therapist is there now.
                    tell(other, presence_message(role, present=True))
                to_self = [
                    outbound(
                        "welcome",
                        protocol=1,
                        role=role.value,
                        consult=str(consult_id),
                        connection=participant.connection_id,
                        state=state.phase.value,
                        peer_present=state.present(other),
                        ice_servers=ice_servers,
                        heartbeat_s=self._settings.heartbeat_s,
                        grace_s=self._settings.grace_s,
                        recording=state.recording.value,
                    )
                ]
                if role is ParticipantRole.THERAPIST and state.patient_waiting:
                    to_self.append(await self.labels.patient_waiting(label))
        if not to_self:
            raise RoomClosed
        return to_self, replaced

    async def handle(
        self, participant: Participant, message: InboundMessage, *, frame: str | None = None
    ) -> list[dict[str, Any]]:
        """Act on one valid message; return replies for the sender.

        ``frame`` is the message's text as received; a relayed message is
        passed on as that text plus its sender, without encoding it again.
        Raises :class:`ProtocolError` for messages that are valid but not
        acceptable now (wrong consult, wrong role, not admitted), and with
        ``unavailable`` when Redis or the database cannot be reached."""
        try:
            if message.type in RELAYED:
                # The hot path, and a relay is one step: nothing to cut in half.
                return await self._handle(participant, message, frame)
            return await self._changes.to_the_end(self._handle(participant, message, frame))
        except StateUnavailable as err:
            _log.warning(
                "message not handled: shared state unavailable", type=message.type, error=str(err)
            )
            raise ProtocolError.unavailable(message.type) from err
        except Exception as err:
            if not (is_outage(err) or is_busy(err)):
                raise
            # The database away (a restart, a network drop) or SQLite held by
            # another writer: the change wrote nothing (each writes the record
            # before the room), and the sender may try again, as with Redis away.
            _log.warning(
                "message not handled: database unavailable or busy",
                type=message.type,
                error=type(err).__name__,
            )
            raise ProtocolError.unavailable(message.type) from err

    async def _handle(
        self, participant: Participant, message: InboundMessage, frame: str | None
    ) -> list[dict[str, Any]]:
        if message.consult is not None and not names_consult(
            message.consult, participant.consult_id
        ):
            raise ProtocolError(
                ErrorCode.NOT_IN_CONSULT,
                "this connection belongs to another consult",
                ref=message.type,
            )
        if message.type in RELAYED:
            await self._relay(participant, message, frame)
            return []
        if isinstance(message, Ping):
            return [outbound("pong")]
        if isinstance(message, Report):
            self._report(participant, message, frame)
            return []
        if message.type in THERAPIST_ONLY and participant.role is not ParticipantRole.THERAPIST:
            raise ProtocolError(
                ErrorCode.NOT_ALLOWED,
                f"only the therapist may send {message.type}",
                ref=message.type,
            )
        if message.type in PATIENT_ONLY and participant.role is not ParticipantRole.PATIENT:
            raise ProtocolError(
                ErrorCode.NOT_ALLOWED,
                f"only the patient may send {message.type}",
                ref=message.type,
            )
        if isinstance(message, RecordRequest | RecordConsent | RecordStop | RecorderOffer):
            return await self.recording.handle(participant.consult_id, participant.role, message)
        if isinstance(message, Admit):
            return await self._admit(participant)
        if isinstance(message, Deny):
            return await self._deny(participant)
        if isinstance(message, End):
            await self.end(participant.consult_id, reason=EndReason.ENDED_BY_THERAPIST)
            return []
        if isinstance(message, Bye):
            await self.leave(participant, grace=False)
            return []
        raise AssertionError(f"unhandled message type {message.type}")  # pragma: no cover

    async def _leave_once_joined(
        self, joining: asyncio.Task[tuple[list[dict[str, Any]], bool]], participant: Participant
    ) -> None:
        with contextlib.suppress(Exception):
            await joining
            await self.leave(participant, grace=True)

    async def disconnect(self, participant: Participant) -> None:
        """The connection went away: start the grace period, or leave the waiting
        room (with Redis away, kept and told again by :meth:`reconcile`)."""
        self._here.pop(participant.connection_id, None)
        self.reports.forget_connection(participant.connection_id)
        try:
            await self._changes.to_the_end(self.leave(participant, grace=True))
        except StateUnavailable as err:
            _log.warning("disconnect kept for later: shared state unavailable", error=str(err))
            self.recovery.missed_leave(participant)

    @property
    def connected_here(self) -> list[Participant]:
        """The participants connected to this node."""
        return list(self._here.values())

    async def room_state(self, consult_id: uuid.UUID) -> RoomState | None:
        """The room's state as last saved (read only), or None."""
        return await self._store.peek(consult_id)

    def is_here(self, participant: Participant) -> bool:
        """Whether this connection is still open on this node."""
        return participant.connection_id in self._here

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Let the room changes still running finish (on shutdown)."""
        await self._changes.drain(timeout_s)

    async def fire_due_timers(self) -> int:
        """Act on every due deadline (grace periods, maximum duration); return how many."""
        return await self.deadlines.fire_due()

    async def reconcile(self) -> int:
        """Tell the shared state again what this node knows (see :class:`Recovery`)."""
        return await self.recovery.reconcile()

    async def node_lost(self, consult_id: uuid.UUID, node: str, *, last_seen: datetime) -> int:
        """Another node died: its participants here drop out (see :class:`Recovery`)."""
        return await self.recovery.node_lost(consult_id, node, last_seen=last_seen)

    async def end(
        self,
        consult_id: uuid.UUID,
        *,
        reason: EndReason,
        at: datetime | None = None,
        again: bool = False,
    ) -> None:
        """End the consult for both: record the end, tell them, close their sockets.
        ``at`` is the end time to record (default now): when both left, the
        moment the last one went, not the end of the grace period. ``again``
        (the repair): a room already over is told all the same."""
        ended_at = at or self._clock.now()
        async with self._engine.begin() as conn:
            await mark_ended(conn, consult_id, now=ended_at, end_reason=reason.value)
        try:
            async with self._store.locked(consult_id, create=True) as state:
                assert state is not None
                already_over = state.phase is RoomPhase.OVER
                state.phase = RoomPhase.OVER
                state.therapist = state.patient = None
            if already_over and not again:
                return
            self.reports.forget_consult(consult_id)
            if self.recording.is_active(consult_id):
                await self._stop_recording(consult_id, StopReason.CONSULT_ENDED)
            # The timers first: once told, a participant may act at once (connect
            # again, or, in a test, move the clock), and must find them set.
            for role in ParticipantRole:
                await self._timers.cancel(TimerKind.GRACE.key(consult_id, role))
            await self._timers.cancel(TimerKind.MAX_DURATION.key(consult_id))
            await self.deadlines.forget_later(consult_id)
            # How it ended, for support (24 hours): the record keeps only times.
            how = {"reason": reason.value}
            self._technical.log.info("signaling.consult-ended", subject=str(consult_id), **how)
            ended = outbound("consult-ended", reason=reason)
            for role in ParticipantRole:
                await self.send(consult_id, role, ended, close_code=CloseCode.ENDED)
        except StateUnavailable:
            # Recorded; the room is told once Redis answers (reconcile ends it
            # again, all of it, also when the room was saved as over already).
            self.recovery.missed_end(consult_id, reason, ended_at)
            raise
        _log.info("consult ended", consult_id=str(consult_id), reason=reason)

    async def _admit(self, participant: Participant) -> list[dict[str, Any]]:
        consult_id = participant.consult_id
        record_closed = False
        async with self._change(consult_id) as (state, tell):
            if state is None or not state.patient_waiting:
                raise ProtocolError(
                    ErrorCode.NO_PATIENT_WAITING,
                    "no patient is waiting to be admitted",
                    ref="admit",
                )
            consult = await start_consult(self._statements, consult_id, now=self._clock.now())
            if consult.is_over or consult.started_at is None:
                record_closed = True
            else:
                state.phase = RoomPhase.ACTIVE
                await self._timers.schedule(
                    TimerKind.MAX_DURATION.key(consult_id),
                    consult.started_at + timedelta(seconds=self._settings.max_duration_s),
                    {"consult": str(consult_id)},
                )
                key = self._receipt_key(consult_id)
                tell(ParticipantRole.PATIENT, outbound("admitted", receipt_key=key))
        if record_closed:
            # Closed meanwhile (by the housekeeping or another node): no call on a closed record.
            await self.end(consult_id, reason=EndReason.CONSULT_OVER)
            raise ProtocolError(ErrorCode.CONSULT_OVER, "the consult is over", ref="admit")
        return [outbound("peer-joined", role=ParticipantRole.PATIENT.value)]

    async def _deny(self, participant: Participant) -> list[dict[str, Any]]:
        consult_id = participant.consult_id
        async with self._change(consult_id) as (state, tell):
            if state is None or not state.patient_waiting:
                raise ProtocolError(
                    ErrorCode.NO_PATIENT_WAITING, "no patient is waiting to be denied", ref="deny"
                )
            state.patient = None
            tell(ParticipantRole.PATIENT, outbound("denied"), close_code=CloseCode.DENIED)
        return []

    async def link_revoked(self, consult_id: uuid.UUID) -> bool:
        """The therapist revoked the invite: a patient waiting with it is sent
        away, as by ``deny``. An admitted patient stays in the running consult
        (the therapist ends it to end their part), but cannot come back after
        a drop. Returns whether a waiting patient was sent away."""
        async with self._change(consult_id) as (state, tell):
            if state is None or not state.patient_waiting:
                return False
            state.patient = None
            tell(ParticipantRole.PATIENT, outbound("denied"), close_code=CloseCode.DENIED)
            tell(
                ParticipantRole.THERAPIST, outbound("peer-left", role=ParticipantRole.PATIENT.value)
            )
        return True

    def relay_route(self, participant: Participant) -> Route:
        """Where ``participant``'s relays go at once, without waiting, where
        that can be done (:class:`signaling.relay.Route`; when it cannot,
        :meth:`handle` the message)."""
        return self._relay.route(participant)

    async def leave(
        self, participant: Participant, *, grace: bool, left_at: datetime | None = None
    ) -> None:
        """``left_at``: when the socket went (default now), if that was a while ago."""
        consult_id, role, other = participant.consult_id, participant.role, participant.role.other
        end_at: datetime | None = None
        async with self._change(consult_id) as (state, tell):
            if state is None or state.phase is RoomPhase.OVER:
                return
            presence = state.presence(role)
            if presence is None or presence.connection_id != participant.connection_id:
                return  # a replaced connection, or already gone
            if not presence.connected and grace:
                return  # in its grace period already
            now = self._clock.now()
            left = left_at or now
            if state.phase is RoomPhase.WAITING:
                state.set_presence(role, None)
                if role is ParticipantRole.PATIENT:
                    tell(other, outbound("peer-left", role=role.value))
                elif state.present(other):
                    tell(other, presence_message(role, present=False))
            elif grace:
                state.set_presence(role, replace(presence, link=Link.RECONNECTING, left_at=left))
                await self._timers.schedule(
                    TimerKind.GRACE.key(consult_id, role),
                    now + timedelta(seconds=self._settings.grace_s),
                    {
                        "consult": str(consult_id),
                        "role": role.value,
                        "connection": participant.connection_id,
                    },
                )
                grace_s = self._settings.grace_s
                tell(other, outbound("peer-reconnecting", role=role.value, grace_s=grace_s))
            else:
                state.set_presence(role, None)
                tell(other, outbound("peer-left", role=role.value))
                # The other one, in its grace period, ends it when that runs out, at
                # this moment if it does not come back (this one went last).
                if (away := state.presence(other)) is None:
                    end_at = left
                elif not away.connected:
                    state.set_presence(other, replace(away, left_at=left))
        self._note(participant, "signaling.disconnected", {"grace": grace})
        if self.recording.is_active(consult_id):
            # A participant who drops out stops the recording; coming back
            # never restarts it (the therapist asks again, the patient agrees again).
            await self._stop_recording(consult_id, StopReason.PARTICIPANT_LEFT)
        if end_at is not None:
            await self.end(consult_id, reason=EndReason.BOTH_LEFT, at=end_at)

    def _report(self, participant: Participant, message: Report, frame: str | None) -> None:
        """A client's diagnostic into the technical log, within its quotas."""
        detail = dict(message.detail)
        size = len(frame) if frame is not None else len(json.dumps(detail))
        verdict = self.reports.take(participant.consult_id, participant.connection_id, size)
        if verdict is Verdict.KEEP:
            self._note(participant, f"client.{message.event}", detail)
            return
        self._technical.dropped[DropReason.REPORT_QUOTA] += 1
        if verdict is Verdict.FIRST_DROP:
            self._note(participant, "client.reports_dropped", {"reason": "quota"})

    async def _stop_recording(self, consult_id: uuid.UUID, reason: StopReason) -> None:
        """Stop the consult's recording; a failure there never stops the
        consult's own end or leave from going on."""
        try:
            await self.recording.stop(consult_id, reason)
        except Exception:
            _log.exception("recording: stopping failed", consult_id=str(consult_id))

    async def send(
        self,
        consult_id: uuid.UUID,
        role: ParticipantRole,
        message: dict[str, Any],
        *,
        connection_id: str | None = None,
        close_code: CloseCode | None = None,
    ) -> None:
        await self._broker.publish(
            consult_id, role, Delivery(message, connection_id=connection_id, close_code=close_code)
        )

    def _note(
        self, participant: Participant, kind: str, detail: dict[str, Any] | None = None
    ) -> None:
        """A diagnostic for the technical log (24 hours), tied to the consult."""
        self._technical.log.info(
            kind,
            subject=str(participant.consult_id),
            role=participant.role.value,
            connection=participant.connection_id,
            detail=detail or {},
        )
