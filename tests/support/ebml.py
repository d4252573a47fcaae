"""What a Matroska/WebM file's top level says: written from the Matroska
specification (RFC 9559), not from libavformat, to check what a player finds
without reading the clusters: the segment's duration, and an index (Cues)
that the SeekHead at the start points to."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

EBML_HEADER = 0x1A45DFA3
SEGMENT = 0x18538067
SEEK_HEAD = 0x114D9B74
SEEK = 0x4DBB
SEEK_ID = 0x53AB
SEEK_POSITION = 0x53AC
INFO = 0x1549A966
TIMESTAMP_SCALE = 0x2AD7B1
DURATION = 0x4489
CUES = 0x1C53BB6B
CUE_POINT = 0xBB
CLUSTER = 0x1F43B675
UNKNOWN_SIZE = -1


@dataclass
class TopLevel:
    """The segment's children, by id, with their offsets from the segment's data."""

    # Element id -> offsets (relative to the segment's data) where it starts.
    children: dict[int, list[int]] = field(default_factory=dict)
    # What the SeekHead points to: element id -> offset from the segment's data.
    seek_entries: dict[int, int] = field(default_factory=dict)
    duration_s: float | None = None
    cue_points: int = 0
    segment_size_known: bool = False


def _vint(data: bytes, at: int, *, keep_marker: bool) -> tuple[int, int]:
    first = data[at]
    length = 1
    while length <= 8 and not first & (0x80 >> (length - 1)):
        length += 1
    if length > 8:
        raise ValueError(f"no variable-length integer at {at}")
    value = first if keep_marker else first & (0xFF >> length)
    all_ones = value == (0xFF >> length)
    for byte in data[at + 1 : at + length]:
        value = value << 8 | byte
        all_ones = all_ones and byte == 0xFF
    if not keep_marker and all_ones:
        return UNKNOWN_SIZE, at + length
    return value, at + length


def _element(data: bytes, at: int) -> tuple[int, int, int]:
    """(id, size, start of its data) of the element at ``at``."""
    element_id, at = _vint(data, at, keep_marker=True)
    size, at = _vint(data, at, keep_marker=False)
    return element_id, size, at


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    at = start
    while at < end:
        element_id, size, body = _element(data, at)
        out.append((element_id, size, body))
        if size == UNKNOWN_SIZE:
            break
        at = body + size
    return out


def read_top_level(media: bytes) -> TopLevel:
    """The segment's top level of ``media``, a whole Matroska file."""
    element_id, size, body = _element(media, 0)
    assert element_id == EBML_HEADER, "not an EBML file"
    segment_id, segment_size, segment = _element(media, body + size)
    assert segment_id == SEGMENT, "no Segment after the EBML header"
    top = TopLevel(segment_size_known=segment_size != UNKNOWN_SIZE)
    at, end = segment, len(media)
    scale_ns, duration = 1_000_000, None
    while at < end:
        element_id, size, body = _element(media, at)
        top.children.setdefault(element_id, []).append(at - segment)
        if size == UNKNOWN_SIZE:
            break  # a live cluster: what follows cannot be skipped without parsing it
        if element_id == SEEK_HEAD:
            for seek_id, seek_size, seek_body in _children(media, body, body + size):
                if seek_id != SEEK:
                    continue
                entry = {
                    child: int.from_bytes(media[child_body : child_body + child_size])
                    for child, child_size, child_body in _children(
                        media, seek_body, seek_body + seek_size
                    )
                }
                # A SeekID holds the element id's bytes, marker bits and all.
                top.seek_entries[entry[SEEK_ID]] = entry[SEEK_POSITION]
        elif element_id == INFO:
            for child, child_size, child_body in _children(media, body, body + size):
                raw = media[child_body : child_body + child_size]
                if child == TIMESTAMP_SCALE:
                    scale_ns = int.from_bytes(raw)
                elif child == DURATION:
                    duration = struct.unpack(">f" if child_size == 4 else ">d", raw)[0]
        elif element_id == CUES:
            top.cue_points += sum(
                1
                for child, _size, _body in _children(media, body, body + size)
                if child == CUE_POINT
            )
        at = body + size
    if duration is not None:
        top.duration_s = duration * scale_ns / 1e9
    return top
