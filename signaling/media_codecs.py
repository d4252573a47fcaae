"""What the recorder needs to know of the encoded media it copies (pure).

The recorder never decodes: it reads just enough of each encoded frame to
know whether it is a keyframe (a picture that decodes without the ones
before it) and, for a keyframe, the picture's size, which the container's
header wants. And it picks the container the codecs fit in.

- VP8 (RFC 6386, section 9.1): the first byte's bit 0 is 0 for a keyframe;
  a keyframe carries the start code ``9d 01 2a`` in bytes 3-5 and its width
  and height (14 bits each, little-endian) in bytes 6-9.
- H.264 in Annex B form (start codes, as aiortc's depayloader hands it
  over): a keyframe holds an IDR slice (NAL unit type 5); its size comes
  from the sequence parameter set (type 7) sent with it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from audit import media_types
from audit.media_types import MediaFormat

# What the header says of a picture whose size could not be read (an H.264
# stream whose parameter set uses what the parser below does not follow).
# Decoders take the size from the stream itself; players may use this for
# the aspect ratio only.
FALLBACK_SIZE = (640, 480)


class MediaCodec(enum.StrEnum):
    """A codec the recorder can copy into a file, named as FFmpeg names it."""

    OPUS = "opus"
    VP8 = "vp8"
    H264 = "h264"

    @classmethod
    def from_mime_type(cls, mime_type: str) -> MediaCodec:
        """``video/VP8`` -> VP8; raises ValueError for a codec the recorder cannot copy."""
        name = mime_type.partition("/")[2].lower()
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"the recorder cannot copy {mime_type!r} into a file") from None

    @property
    def is_video(self) -> bool:
        return self is not MediaCodec.OPUS


@dataclass(frozen=True)
class Container:
    """A container format: the FFmpeg muxer that writes it, and what the file is
    (media type and suffix, as :mod:`audit.media_types` reads it back)."""

    muxer: str
    kind: MediaFormat

    @property
    def media_type(self) -> str:
        return self.kind.media_type


WEBM = Container("webm", media_types.WEBM)
MATROSKA = Container("matroska", media_types.MATROSKA)


def container_for(codecs: set[MediaCodec]) -> Container:
    """WebM holds VP8 (and VP9) with Opus; H.264 needs Matroska, WebM's parent format."""
    return MATROSKA if MediaCodec.H264 in codecs else WEBM


def is_keyframe(codec: MediaCodec, frame: bytes) -> bool:
    """Whether the encoded ``frame`` decodes on its own (audio frames always do)."""
    if codec is MediaCodec.VP8:
        return len(frame) >= 10 and not frame[0] & 0x01
    if codec is MediaCodec.H264:
        return any(nal and nal[0] & 0x1F == 5 for nal in nal_units(frame))
    return True


def picture_size(codec: MediaCodec, keyframe: bytes) -> tuple[int, int] | None:
    """Width and height of a keyframe's picture, or None when it does not say."""
    if codec is MediaCodec.VP8:
        if len(keyframe) < 10 or keyframe[3:6] != b"\x9d\x01\x2a":
            return None
        width = int.from_bytes(keyframe[6:8], "little") & 0x3FFF
        height = int.from_bytes(keyframe[8:10], "little") & 0x3FFF
        return (width, height) if width and height else None
    if codec is MediaCodec.H264:
        for nal in nal_units(keyframe):
            if nal and nal[0] & 0x1F == 7:
                return sps_picture_size(nal)
    return None


def nal_units(stream: bytes) -> Iterator[bytes]:
    """The NAL units of an Annex B byte stream (without their start codes)."""
    start = stream.find(b"\x00\x00\x01")
    while start != -1:
        start += 3
        end = stream.find(b"\x00\x00\x01", start)
        if end == -1:
            yield stream[start:]
            return
        # A four-byte start code's leading zero belongs to neither unit.
        yield stream[start : end - 1 if stream[end - 1] == 0 else end]
        start = end


class _Bits:
    """An Exp-Golomb reader over a NAL unit's payload (emulation prevention removed)."""

    def __init__(self, data: bytes) -> None:
        self._data = data.replace(b"\x00\x00\x03", b"\x00\x00")
        self._pos = 0

    def bits(self, count: int) -> int:
        value = 0
        for _ in range(count):
            byte = self._pos >> 3
            if byte >= len(self._data):
                raise ValueError("the parameter set ends early")
            value = (value << 1) | ((self._data[byte] >> (7 - (self._pos & 7))) & 1)
            self._pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.bits(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("an Exp-Golomb code longer than 32 bits")
        return (1 << zeros) - 1 + self.bits(zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) // 2 if code & 1 else -(code // 2)


# Profiles whose parameter sets carry the chroma format and bit depths.
_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def sps_picture_size(sps: bytes) -> tuple[int, int] | None:
    """The cropped picture size an H.264 sequence parameter set (with its NAL
    header byte) describes; None for one that uses scaling matrices or does
    not parse (the caller then uses :data:`FALLBACK_SIZE`)."""
    try:
        bits = _Bits(sps[1:])
        profile = bits.bits(8)
        bits.bits(16)  # constraint flags, level
        bits.ue()  # seq_parameter_set_id
        chroma_format = 1
        if profile in _HIGH_PROFILES:
            chroma_format = bits.ue()
            if chroma_format == 3:
                bits.bits(1)
            bits.ue()  # bit depths
            bits.ue()
            bits.bits(1)
            if bits.bits(1):
                return None  # scaling matrices: not followed here
        bits.ue()  # log2_max_frame_num_minus4
        order_type = bits.ue()
        if order_type == 0:
            bits.ue()
        elif order_type == 1:
            bits.bits(1)
            bits.se()
            bits.se()
            for _ in range(bits.ue()):
                bits.se()
        bits.ue()  # max_num_ref_frames
        bits.bits(1)
        width_mbs = bits.ue() + 1
        height_map_units = bits.ue() + 1
        frame_mbs_only = bits.bits(1)
        if not frame_mbs_only:
            bits.bits(1)
        bits.bits(1)
        crop = [0, 0, 0, 0]
        if bits.bits(1):
            crop = [bits.ue() for _ in range(4)]
    except ValueError:
        return None
    crop_x = 2 if chroma_format in (1, 2) else 1
    crop_y = (2 if chroma_format == 1 else 1) * (2 - frame_mbs_only)
    width = width_mbs * 16 - crop_x * (crop[0] + crop[1])
    height = (2 - frame_mbs_only) * height_map_units * 16 - crop_y * (crop[2] + crop[3])
    return (width, height) if width > 0 and height > 0 else None
