"""The practice's mail server for e-mail invitations (``[smtp]``, see
docs/integrations.md)."""

from __future__ import annotations

from email.utils import getaddresses
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from config.section import Section
from config.zones import known_zone

__all__ = ["SmtpSettings"]


class SmtpSettings(Section):
    host: str
    port: int = Field(ge=1, le=65535)
    security: Literal["starttls", "tls", "none"]
    username: str
    password: SecretStr
    from_address: str
    language: Literal["en", "nl"]
    time_zone: str
    timeout_s: float = Field(gt=0, le=120)
    # A CA bundle to check the server's certificate against; empty: the system's.
    ca_file: str

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            known_zone(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a time zone (e.g. Europe/Amsterdam)") from None
        return value

    @field_validator("ca_file")
    @classmethod
    def _readable_ca_file(cls, value: str) -> str:
        # Checked at start: a wrong path would otherwise fail each send.
        if value and not Path(value).is_file():
            raise ValueError(f"{value!r} is not a file (a CA bundle in PEM, or empty)")
        return value

    @model_validator(mode="after")
    def _sender_with_host(self) -> SmtpSettings:
        if self.host and "@" not in self.from_address:
            raise ValueError(
                "smtp.host needs smtp.from_address, an address like video@praktijk.example"
            )
        if self.host and self.security == "none" and self.host not in _LOOPBACK_HOSTS:
            if self.username:
                raise ValueError(
                    "smtp.username needs smtp.security 'starttls' or 'tls': "
                    "a password is never sent in the clear"
                )
            # Found in review: without a login, plain text to another host was
            # let through; the patient's address and the link would cross the
            # network in the clear.
            raise ValueError(
                "smtp.security 'none' is for a relay on this machine only (localhost, "
                "127.0.0.1, ::1): an invitation is never sent over a network in the clear"
            )
        if self.host and not _one_address(self.from_address):
            raise ValueError(
                "smtp.from_address must be one address, like "
                "'Praktijk Noord <video@praktijk-noord.nl>'"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.host)


_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _one_address(text: str) -> bool:
    """Whether ``text`` is one mail address (with or without a name): no line
    breaks (a header of its own), no second address."""
    if "\r" in text or "\n" in text:
        return False
    found = getaddresses([text])
    return len(found) == 1 and "@" in found[0][1]
