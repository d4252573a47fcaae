"""A mark to tell one saved room state from another in the room stores' tests.

A room's state holds no free text of its own (the therapist's label never
enters it), so the mark is the therapist's connection id: a string that the
stores save and read back like any other field.
"""

from __future__ import annotations

from signaling.state import Presence, RoomState


def mark(state: RoomState, text: str) -> None:
    """Set the state's mark."""
    state.therapist = Presence(text)


def marked(text: str) -> RoomState:
    """A new room state with this mark."""
    return RoomState(therapist=Presence(text))


def mark_of(state: RoomState | None) -> str | None:
    """The state's mark (None for no state, or no mark)."""
    if state is None or state.therapist is None:
        return None
    return state.therapist.connection_id
