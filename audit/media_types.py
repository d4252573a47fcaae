"""What kind of media file a decrypted recording is, from its first bytes (pure).

Recordings are EBML files: WebM (VP8 and Opus, what the pass-through recorder
writes for browsers that send VP8) or Matroska (H.264, and every recording
made before issue 18). The header's ``DocType`` element says which, so the
row needs no column for it and old recordings keep their type.
"""

from __future__ import annotations

from dataclasses import dataclass

EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_DOC_TYPE = b"\x42\x82"
# The EBML header is a few dozen bytes; DocType comes early in it.
_HEADER_WINDOW = 64


@dataclass(frozen=True)
class MediaFormat:
    media_type: str
    suffix: str


WEBM = MediaFormat("video/webm", ".webm")
MATROSKA = MediaFormat("video/x-matroska", ".mkv")


def media_format(first_bytes: bytes) -> MediaFormat:
    """WebM when the EBML header's DocType says ``webm``; Matroska otherwise
    (the format of every earlier recording)."""
    if not first_bytes.startswith(EBML_MAGIC):
        return MATROSKA
    window = first_bytes[:_HEADER_WINDOW]
    at = window.find(_DOC_TYPE)
    if at == -1 or at + 3 > len(window):
        return MATROSKA
    size_byte = window[at + 2]
    # A one-byte EBML size (1xxxxxxx) is all a DocType ever needs.
    if not size_byte & 0x80:
        return MATROSKA
    size = size_byte & 0x7F
    doc_type = window[at + 3 : at + 3 + size]
    return WEBM if doc_type == b"webm" else MATROSKA
