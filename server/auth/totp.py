"""Time-based one-time codes (RFC 6238, 30-second steps, 6 digits) with pyotp."""

from __future__ import annotations

import hmac
import re
from datetime import datetime

import pyotp
import segno

STEP_S = 30
DIGITS = 6
# One step either side: phones whose clock is up to 30 s off still work.
DRIFT_STEPS = 1
ISSUER = "videoconsult"
CODE_PATTERN = re.compile(rf"\d{{{DIGITS}}}")


def new_secret() -> str:
    """Return a new random base32 secret (160 bits)."""
    return pyotp.random_base32()


def provisioning_uri(secret: str, account_label: str) -> str:
    """Return the otpauth:// URI an authenticator app reads from the QR code."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S).provisioning_uri(
        name=account_label, issuer_name=ISSUER
    )


def qr_code_svg_data_uri(uri: str) -> str:
    """Render ``uri`` as a QR code: an SVG data URI, made here, no outside service."""
    data_uri: str = segno.make(uri, error="m").svg_data_uri(scale=5, border=2)
    return data_uri


def matching_step(secret: str, code: str, *, now: datetime) -> int | None:
    """Return the time step whose code is ``code`` (allowing drift), or None.

    The caller must still claim the step (one use per account), so that a
    replayed code is refused.
    """
    if not CODE_PATTERN.fullmatch(code):
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S)
    current = int(now.timestamp()) // STEP_S
    found = None
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        # Compare every candidate, in constant time: no early exit to time.
        if hmac.compare_digest(totp.generate_otp(step), code):
            found = step
    return found
