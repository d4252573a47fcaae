"""A real SMTP server for the invitation tests (aiosmtpd), with STARTTLS or
implicit TLS and AUTH, under a self-signed certificate made for the test."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SMTP_USER = "praktijk-noord"
SMTP_PASSWORD = "smtp secret for the test"


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key; both as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@dataclass
class Mailbox:
    """What the server accepted, and the logins it saw."""

    messages: list[EmailMessage] = field(default_factory=list)
    recipients: list[list[str]] = field(default_factory=list)
    logins: list[tuple[str, bool]] = field(default_factory=list)
    tls_seen: list[bool] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        self.recipients.append(list(envelope.rcpt_tos))
        # STARTTLS sets session.ssl; implicit TLS shows on the transport.
        implicit = server.transport.get_extra_info("ssl_object") is not None
        self.tls_seen.append(session.ssl is not None or implicit)
        return "250 OK"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        ok = login == SMTP_USER and password == SMTP_PASSWORD
        self.logins.append((login, ok))
        # handled=False: aiosmtpd answers (235, or 535 on a refusal) itself.
        return AuthResult(success=ok, handled=False)


@dataclass(frozen=True)
class SmtpServer:
    port: int
    security: str
    ca_file: Path
    mailbox: Mailbox

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """The app's smtp settings (make_settings keywords) for this server."""
        values: dict[str, Any] = {
            "smtp_host": "127.0.0.1",
            "smtp_port": self.port,
            "smtp_security": self.security,
            "smtp_username": SMTP_USER,
            "smtp_password": SMTP_PASSWORD,
            "smtp_from_address": "Praktijk Noord <video@praktijk-noord.example>",
            "smtp_ca_file": str(self.ca_file),
            "smtp_timeout_s": 5,
        }
        values.update(overrides)
        return values


class _Counted(SMTP):
    """aiosmtpd's session, counted while its connection is open (over TLS,
    until the TLS shutdown has closed the socket too)."""

    def __init__(self, *args: Any, open_now: set[SMTP], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open_now = open_now

    def connection_made(self, transport: Any) -> None:
        self._open_now.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._open_now.discard(self)


class _Controller(Controller):
    """aiosmtpd's controller, knowing which connections are still open: its
    stop() ends the server's loop at once, and a connection still in its TLS
    shutdown then leaves its socket to the garbage collector (a
    ResourceWarning that fails whichever test collects it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_now: set[SMTP] = set()

    def factory(self) -> SMTP:
        return _Counted(self.handler, open_now=self.open_now, **self.SMTP_kwargs)

    def stop_when_closed(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.open_now and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stop()


@contextmanager
def running_smtp_server(directory: Path, port: int, *, security: str) -> Iterator[SmtpServer]:
    """An SMTP server on 127.0.0.1:``port`` that wants STARTTLS (``starttls``),
    speaks TLS from the start (``tls``) or offers no TLS (``plain``), and
    AUTH before any mail."""
    cert_file, key_file = self_signed_certificate(directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    mailbox = Mailbox()
    tls_options: dict[str, Any] = (
        {"tls_context": context, "require_starttls": True}
        if security == "starttls"
        # A server that offers no STARTTLS at all (``plain``).
        else {"auth_require_tls": False}
        if security == "plain"
        # aiosmtpd counts only STARTTLS as TLS when it decides to offer AUTH;
        # with implicit TLS the whole connection is encrypted from the start.
        else {"ssl_context": context, "auth_require_tls": False}
    )
    controller = _Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        authenticator=mailbox.authenticate,
        auth_required=True,
        **tls_options,
    )
    controller.start()
    try:
        yield SmtpServer(port, security, cert_file, mailbox)
    finally:
        controller.stop_when_closed()
