"""Sending mail through the practice's SMTP server (aiosmtplib).

:func:`send_mail` hands one message over and says whether the server took
it; a failure is a :class:`MailFailed` whose ``reason`` is fit for the
therapist and the technical log. No message here ever names the recipient:
aiosmtplib's own errors can (a refused recipient), so they are translated,
never passed on.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from email.message import EmailMessage

import aiosmtplib

from config.smtp import SmtpSettings

__all__ = ["MailFailed", "MailProblem", "send_mail"]


class MailProblem(enum.Enum):
    # Why a mail was not accepted, each with words for the therapist.
    NOT_CONFIGURED = "not_configured"
    UNREACHABLE = "unreachable"
    TLS_FAILED = "tls_failed"
    LOGIN_REFUSED = "login_refused"
    RECIPIENT_REFUSED = "recipient_refused"
    REFUSED = "refused"
    TIMEOUT = "timeout"


REASONS = {
    MailProblem.NOT_CONFIGURED: "e-mail invitations are not set up on this server (smtp.host)",
    MailProblem.UNREACHABLE: "the practice's mail server could not be reached",
    MailProblem.TLS_FAILED: "a secure connection to the mail server failed (TLS, its certificate)",
    MailProblem.LOGIN_REFUSED: "the mail server refused the login (smtp.username, smtp.password)",
    MailProblem.RECIPIENT_REFUSED: "the mail server refused the patient's address",
    MailProblem.REFUSED: "the mail server refused the message",
    MailProblem.TIMEOUT: "the mail server did not answer in time",
}


class MailFailed(Exception):
    """The mail server did not accept the message; ``problem`` says why."""

    def __init__(self, problem: MailProblem, *, smtp_code: int | None = None) -> None:
        reason = REASONS[problem]
        if smtp_code is not None:
            reason = f"{reason} (SMTP {smtp_code})"
        super().__init__(reason)
        self.problem = problem
        self.reason = reason


async def send_mail(settings: SmtpSettings, message: EmailMessage) -> None:
    """Hand ``message`` to the configured server; raise :class:`MailFailed` if it
    is not accepted for every recipient."""
    if not settings.enabled:
        raise MailFailed(MailProblem.NOT_CONFIGURED)
    tls = settings.security != "none"
    try:
        # In the try: a CA file that went bad since the start is a TLS failure.
        # Loading the CA store takes tens of ms: in a thread, not on the loop.
        context = (
            await asyncio.to_thread(ssl.create_default_context, cafile=settings.ca_file or None)
            if tls
            else None
        )
        await aiosmtplib.send(
            message,
            hostname=settings.host,
            port=settings.port,
            username=settings.username or None,
            password=settings.password.get_secret_value() or None,
            use_tls=settings.security == "tls",
            start_tls=settings.security == "starttls",
            tls_context=context,
            timeout=settings.timeout_s,
        )
    except aiosmtplib.SMTPAuthenticationError as err:
        raise MailFailed(MailProblem.LOGIN_REFUSED, smtp_code=err.code) from None
    except aiosmtplib.SMTPRecipientsRefused:
        raise MailFailed(MailProblem.RECIPIENT_REFUSED) from None
    except aiosmtplib.SMTPTimeoutError:
        raise MailFailed(MailProblem.TIMEOUT) from None
    except aiosmtplib.SMTPConnectError as err:
        problem = MailProblem.TLS_FAILED if _is_tls(err) else MailProblem.UNREACHABLE
        raise MailFailed(problem) from None
    except aiosmtplib.SMTPResponseException as err:
        raise MailFailed(MailProblem.REFUSED, smtp_code=err.code) from None
    except (aiosmtplib.SMTPException, ssl.SSLError) as err:
        # A server that does not offer the STARTTLS asked for is a TLS failure
        # (aiosmtplib says so only in its message), never a plain-text send.
        no_starttls = "STARTTLS" in str(err) and settings.security == "starttls"
        tls = no_starttls or _is_tls(err)
        raise MailFailed(MailProblem.TLS_FAILED if tls else MailProblem.UNREACHABLE) from None
    except TimeoutError:
        raise MailFailed(MailProblem.TIMEOUT) from None
    except OSError:
        raise MailFailed(MailProblem.UNREACHABLE) from None


def _is_tls(err: BaseException) -> bool:
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return True
        cause = cause.__cause__ or cause.__context__
    return isinstance(err, ssl.SSLError)
