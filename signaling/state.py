"""What a consult room knows beyond the database record: its state model.

Pure data: no I/O, no aiohttp, no Redis. Every :class:`~signaling.ports.RoomStore`
keeps a :class:`RoomState` per consult; the rooms change it only under the
store's lock.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property

from signaling.protocol import ParticipantRole

__all__ = ["Link", "Participant", "Presence", "RecordingPhase", "RoomPhase", "RoomState"]


class RoomPhase(enum.Enum):
    # Before admission: the patient may be in the waiting room.
    WAITING = "waiting"
    # The therapist admitted the patient: the consult runs.
    ACTIVE = "active"
    # Ended; kept a while so that late connects and disconnects find it over.
    OVER = "over"


class RecordingPhase(enum.Enum):
    # Not recording, and no request open.
    OFF = "off"
    # The therapist asked; the patient has not answered yet.
    REQUESTED = "requested"
    # The patient agreed; the browsers connect their media to the recorder.
    STARTING = "starting"
    # The recorder writes the file.
    ON = "on"


class Link(enum.Enum):
    # The participant's socket is open.
    CONNECTED = "connected"
    # The socket dropped; the participant is in the reconnect grace period.
    RECONNECTING = "reconnecting"


@dataclass(frozen=True)
class Presence:
    """One participant's connection to the room."""

    connection_id: str
    link: Link = Link.CONNECTED
    # The end time when nobody comes back: when the socket dropped, or when
    # the other participant left for good after that (the last one to go).
    left_at: datetime | None = None
    # The server node holding the socket ("" for one node): when that node
    # dies, another one starts this participant's grace period.
    node: str = ""

    @property
    def connected(self) -> bool:
        return self.link is Link.CONNECTED


@dataclass
class RoomState:
    """What a consult room knows beyond the database record."""

    phase: RoomPhase = RoomPhase.WAITING
    therapist: Presence | None = None
    patient: Presence | None = None
    recording: RecordingPhase = RecordingPhase.OFF
    # Keep the room at least until then (a consult booked days ahead); a
    # store whose entries expire keeps it that long past this.
    keep_until: datetime | None = None

    def presence(self, role: ParticipantRole) -> Presence | None:
        return self.therapist if role is ParticipantRole.THERAPIST else self.patient

    def set_presence(self, role: ParticipantRole, presence: Presence | None) -> None:
        if role is ParticipantRole.THERAPIST:
            self.therapist = presence
        else:
            self.patient = presence

    def present(self, role: ParticipantRole) -> bool:
        presence = self.presence(role)
        return presence is not None and presence.connected

    @property
    def patient_waiting(self) -> bool:
        return self.phase is RoomPhase.WAITING and self.present(ParticipantRole.PATIENT)

    def copy(self) -> RoomState:
        """A shallow copy; enough, as every field is immutable."""
        return replace(self)


@dataclass(frozen=True)
class Participant:
    """One authenticated connection of one participant of one consult."""

    consult_id: uuid.UUID
    role: ParticipantRole
    # A random id per connection: tells a reconnect from the connection it replaces.
    connection_id: str

    # Worked out once per connection rather than once per relayed message.
    @cached_property
    def other(self) -> ParticipantRole:
        return self.role.other

    @cached_property
    def sender_field(self) -> str:
        """What a relayed frame gets before its closing brace: ``,"sender":"<role>"}``."""
        return f',"sender":"{self.role.value}"}}'
