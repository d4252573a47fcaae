"""Prometheus metrics of one server node: its participants, relays, refusals,
background jobs and Redis.

No label or value carries personal data: labels come only from small fixed
sets (a role, a relayed message type, a protocol error code, a refusal
reason, a background job's name), never a consult id, connection id, address or name. Every metric
is this node's own; Prometheus adds the ``instance`` and sums over nodes
(``docs/metrics.md`` lists them all).

Counters and the relay histogram are added to by the signaling edge as
things happen, as plain numbers (the relay path handles thousands of
messages a second). The gauges (participants, consults, waiting patients,
Redis, the asyncio tasks) are worked out when Prometheus scrapes, from this
node's connections, their rooms, a PING and the event loop.

Each application has a registry of its own (:class:`Metrics`), not the
library's global one: tests build many applications in one process.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.asyncio import Redis
from redis.exceptions import RedisError

from audit.consults import InviteProblem
from audit.outbox import DeliveryStatus
from audit.technical_log import DropReason, TechnicalLog
from server.background import JobName
from server.loop_lag import LoopLag, empty_families
from signaling.ports import StateUnavailable
from signaling.protocol import RELAYED, ErrorCode, ParticipantRole
from signaling.rooms import ConsultRooms
from signaling.state import Participant, RoomPhase, RoomState

# From a frame's arrival to its hand-off to the broker: tens of microseconds
# in one process, a Redis round trip or two across nodes.
RELAY_BUCKETS_S = (
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
# What a scrape waits for Redis (the PING, the rooms' state), well inside
# Prometheus's default scrape timeout of 10 s: a Redis that does not answer
# makes the scrape report it rather than time out.
REDIS_TIMEOUT_S = 1.0
# Room states read at once: the Redis connection pool opens a connection per
# concurrent command, so a node with thousands of consults reads them in batches.
ROOM_STATE_BATCH = 50

# Why a signaling socket was not opened: the edge's refusal codes, and
# "other" for anything not in this list (so no label value is ever free text).
REFUSAL_OTHER = "other"
REFUSAL_REASONS = (
    "origin_refused",
    "host_unknown",
    "ticket_invalid",
    *(f"invite_{problem.value}" for problem in InviteProblem),
    "not_logged_in",
    "forbidden",
    "not_found",
    "consult_over",
    "unavailable",
    "too_many_requests",
    REFUSAL_OTHER,
)


@dataclass(frozen=True)
class RoomCounts:
    """What this node counts of its participants' rooms."""

    # Consults in progress, each counted on the node holding its therapist's
    # socket, or its patient's while the therapist is not connected: summed
    # over nodes, each consult counts once.
    active_consults: int = 0
    # Patients connected here and waiting to be admitted.
    waiting_patients: int = 0


@dataclass(frozen=True)
class NodeState:
    """The gauges of one scrape."""

    participants: Mapping[ParticipantRole, int] = field(
        default_factory=lambda: dict.fromkeys(ParticipantRole, 0)
    )
    # None: the rooms' state could not be read at this scrape (Redis away).
    rooms: RoomCounts | None = None
    # None: no Redis is configured.
    redis_up: bool | None = None
    # The PING's round trip; None when Redis did not answer or is not configured.
    redis_roundtrip_s: float | None = None
    # The asyncio tasks of this process, the scrape's own among them.
    tasks: int = 0


class Metrics:
    """One node's metrics, in a registry of their own.

    The ``record_*`` methods are for the signaling edge. They only add to
    plain numbers (a few hundred nanoseconds per relayed message, where the
    library's lock-guarded counters and histogram would take about two
    microseconds): everything runs on the event loop's thread, so no lock
    is needed, and the totals become metric families only at a scrape.
    :meth:`render` reads the node's state and returns the exposition text.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._relayed = dict.fromkeys(sorted(RELAYED), 0)
        # One count per bucket, not cumulative; the last is +Inf.
        self._relay_buckets = [0] * (len(RELAY_BUCKETS_S) + 1)
        self._relay_sum_s = 0.0
        self._errors = dict.fromkeys(ErrorCode, 0)
        self._opened = dict.fromkeys(ParticipantRole, 0)
        self._refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self._background_failures = dict.fromkeys(JobName, 0)
        self._webhook_attempts = dict.fromkeys(DeliveryStatus, 0)
        self._technical_dropped: dict[DropReason, int] = {}
        self._node = NodeState()
        # The event loop's watcher, while the application runs (server/loop_lag.py).
        self.loop_lag: LoopLag | None = None
        self.registry.register(self)
        ProcessCollector(registry=self.registry)

    def record_relayed(self, kind: str, seconds: float) -> None:
        """A frame of relayed type ``kind`` was handed to the broker ``seconds`` after arrival."""
        self._relayed[kind] += 1
        # The first bound not below ``seconds``: Prometheus's buckets are "<= le".
        self._relay_buckets[bisect_left(RELAY_BUCKETS_S, seconds)] += 1
        self._relay_sum_s += seconds

    def record_error(self, code: ErrorCode) -> None:
        """An ``error`` message with ``code`` was sent to a client."""
        self._errors[code] += 1

    def record_opened(self, role: ParticipantRole) -> None:
        """A signaling socket of ``role`` joined its consult room."""
        self._opened[role] += 1

    def record_refused(self, reason: str) -> None:
        """A signaling socket was refused; an unknown ``reason`` counts as "other"."""
        self._refused[reason if reason in self._refused else REFUSAL_OTHER] += 1

    def record_background_failure(self, job: JobName) -> None:
        """A round of the background job ``job`` failed."""
        self._background_failures[job] += 1

    def record_webhook_attempt(self, status: DeliveryStatus) -> None:
        """A webhook was sent; ``status`` is its delivery's after the attempt."""
        self._webhook_attempts[status] += 1

    async def render(
        self, rooms: ConsultRooms, redis: Redis | None, technical: TechnicalLog
    ) -> bytes:
        """Read this node's state and return the metrics in the text exposition format."""
        self._node = await read_node_state(rooms, redis)
        self._technical_dropped = {reason: technical.dropped[reason] for reason in DropReason}
        # No await between reading the state and rendering it: a concurrent
        # scrape cannot swap in its own state halfway.
        return generate_latest(self.registry)

    def describe(self) -> Iterator[Metric]:
        """The families this collector yields (for the registry's name check)."""
        everything = NodeState(rooms=RoomCounts(), redis_up=True, redis_roundtrip_s=0)
        yield from self._counter_families()
        yield from empty_families()
        yield from _node_families(everything)

    def collect(self) -> Iterator[Metric]:
        """Every family, from the totals so far and the last scrape's node state."""
        yield from self._counter_families()
        if self.loop_lag is not None:
            yield from self.loop_lag.families()
        yield from _node_families(self._node)

    def _counter_families(self) -> Iterator[Metric]:
        yield _counter(
            "videoconsult_signaling_messages_relayed",
            "Signaling messages relayed to the other participant, by type.",
            "type",
            self._relayed.items(),
        )
        cumulative = list(accumulate(self._relay_buckets))
        bounds = [*(repr(bound) for bound in RELAY_BUCKETS_S), "+Inf"]
        yield HistogramMetricFamily(
            "videoconsult_signaling_relay_seconds",
            "Time from a relayed frame's arrival to its hand-off to the broker.",
            buckets=list(zip(bounds, cumulative, strict=True)),
            sum_value=self._relay_sum_s,
        )
        yield _counter(
            "videoconsult_signaling_errors",
            "Protocol error messages sent to clients, by error code.",
            "code",
            ((code.value, count) for code, count in self._errors.items()),
        )
        yield _counter(
            "videoconsult_signaling_connections",
            "Signaling sockets that joined their consult room, by role.",
            "role",
            ((role.value, count) for role, count in self._opened.items()),
        )
        yield _counter(
            "videoconsult_signaling_connections_refused",
            "Signaling sockets refused or closed before joining their room, by reason.",
            "reason",
            self._refused.items(),
        )
        yield _counter(
            "videoconsult_technical_log_dropped",
            "Technical-log entries not kept, by reason: the writer's queue full "
            "(database away), the table at logging.technical_log_max_rows, or a "
            "client's reports past their quota.",
            "reason",
            ((reason.value, self._technical_dropped.get(reason, 0)) for reason in DropReason),
        )
        yield _counter(
            "videoconsult_background_failures",
            "Rounds of a background job that failed (and were tried again later), by job.",
            "job",
            ((job.value, count) for job, count in self._background_failures.items()),
        )
        yield _counter(
            "videoconsult_webhook_attempts",
            "Webhook messages sent by this node, by their delivery's status after the "
            "attempt: delivered, pending (failed, tried again later), failed (for good).",
            "status",
            ((status.value, count) for status, count in self._webhook_attempts.items()),
        )


def _counter(
    name: str, documentation: str, label: str, counts: Iterable[tuple[str, int]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts:
        family.add_metric([value], count)
    return family


async def read_node_state(rooms: ConsultRooms, redis: Redis | None) -> NodeState:
    """The participants connected to this node, their rooms, and Redis's round trip."""
    here = rooms.connected_here
    participants = dict.fromkeys(ParticipantRole, 0)
    for participant in here:
        participants[participant.role] += 1
    counts, roundtrip_s = await asyncio.gather(_count_rooms(rooms, here), _redis_roundtrip_s(redis))
    return NodeState(
        participants=participants,
        rooms=counts,
        # Counted after the awaits, from the event loop's own set: a
        # few microseconds per thousand tasks.
        tasks=len(asyncio.all_tasks()),
        redis_up=None if redis is None else roundtrip_s is not None,
        redis_roundtrip_s=roundtrip_s,
    )


def count_rooms(
    states: Mapping[uuid.UUID, RoomState | None], here: Iterable[Participant]
) -> RoomCounts:
    """Count the consults in progress and the waiting patients of the
    participants ``here``, from their rooms' ``states``."""
    connections: dict[uuid.UUID, set[str]] = {}
    for participant in here:
        connections.setdefault(participant.consult_id, set()).add(participant.connection_id)
    active = waiting = 0
    for consult_id, state in states.items():
        mine = connections.get(consult_id, set())
        if state is None or not mine:
            continue
        # Compared by connection id: a connection just replaced by one from
        # another device (or node) no longer counts as the participant's.
        therapist, patient = state.therapist, state.patient
        if state.phase is RoomPhase.ACTIVE:
            counted_by = therapist if therapist is not None and therapist.connected else patient
            if counted_by is not None and counted_by.connected and counted_by.connection_id in mine:
                active += 1
        elif state.patient_waiting and patient is not None and patient.connection_id in mine:
            waiting += 1
    return RoomCounts(active_consults=active, waiting_patients=waiting)


async def _count_rooms(rooms: ConsultRooms, here: Sequence[Participant]) -> RoomCounts | None:
    consult_ids = list(dict.fromkeys(participant.consult_id for participant in here))
    states: dict[uuid.UUID, RoomState | None] = {}
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            for start in range(0, len(consult_ids), ROOM_STATE_BATCH):
                batch = consult_ids[start : start + ROOM_STATE_BATCH]
                read = await asyncio.gather(
                    *(rooms.room_state(consult_id) for consult_id in batch),
                    return_exceptions=True,
                )
                for consult_id, result in zip(batch, read, strict=True):
                    if isinstance(result, StateUnavailable):
                        return None
                    if isinstance(result, BaseException):
                        raise result
                    states[consult_id] = result
    except TimeoutError:
        return None
    return count_rooms(states, here)


async def _redis_roundtrip_s(client: Redis | None) -> float | None:
    if client is None:
        return None
    started = time.perf_counter()
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await client.ping()
    except (TimeoutError, RedisError, OSError):
        return None
    return time.perf_counter() - started


def _node_families(state: NodeState) -> Iterator[Metric]:
    participants = GaugeMetricFamily(
        "videoconsult_signaling_participants",
        "Participants connected to this node's signaling socket, by role.",
        labels=["role"],
    )
    for role in ParticipantRole:
        participants.add_metric([role.value], state.participants.get(role, 0))
    yield participants
    yield GaugeMetricFamily(
        "videoconsult_asyncio_tasks",
        "asyncio tasks not yet done in this node's process (the scrape's own included).",
        value=state.tasks,
    )
    if state.rooms is not None:
        yield GaugeMetricFamily(
            "videoconsult_consults_active",
            "Consults in progress, counted on the node of the therapist's socket "
            "(or of the patient's while the therapist reconnects): sum over nodes.",
            value=state.rooms.active_consults,
        )
        yield GaugeMetricFamily(
            "videoconsult_patients_waiting",
            "Patients connected to this node and waiting to be admitted.",
            value=state.rooms.waiting_patients,
        )
    if state.redis_up is not None:
        yield GaugeMetricFamily(
            "videoconsult_redis_up",
            "1 if Redis answered this scrape's PING in time, else 0.",
            value=1 if state.redis_up else 0,
        )
    if state.redis_roundtrip_s is not None:
        yield GaugeMetricFamily(
            "videoconsult_redis_roundtrip_seconds",
            "Round trip of this scrape's PING to Redis.",
            value=state.redis_roundtrip_s,
        )
