"""Process logs: structlog to stdout, with personal data taken out.

Process logs are read by whoever runs the server, kept by whatever collects
stdout, and never expire. So they carry no personal data at all: values under
sensitive keys are dropped, and IP addresses, e-mail addresses, tokens and
one-time codes are masked wherever else they turn up, including in messages
and tracebacks from other libraries. In a traceback only what the exceptions
say is masked: the code of its frames is the program, not data, and stays as
it is. Personal diagnostics belong in the 24-hour technical log instead.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import sys
import textwrap
import traceback
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[redacted]"

# A key is sensitive when any of its underscore-separated parts is one of
# these (``client_ip``, ``patient_name``, ``invite_token``, ``user_agent``).
SENSITIVE_KEY_PARTS = frozenset(
    {
        "addr",
        "address",
        "agent",
        "authorization",
        "birth",
        "bsn",
        "candidate",
        "cookie",
        "display",
        "email",
        "external",
        "firstname",
        "ip",
        "label",
        "lastname",
        "mail",
        "name",
        "otp",
        "passwd",
        "password",
        "patient",
        "peername",
        "phone",
        "reference",
        "sdp",
        "secret",
        "session",
        "surname",
        "ticket",
        "token",
        "totp",
        "user",
        "username",
    }
)
# Whole keys that are sensitive though their parts are ordinary words.
SENSITIVE_KEYS = frozenset({"code", "remote", "host_ip", "x_forwarded_for", "forwarded"})
# Keys structlog and logging fill in themselves.
FRAMEWORK_KEYS = frozenset({"event", "level", "timestamp", "logger", "exception"})

# The local part with every character an address may hold unquoted (RFC 5322
# "atext", as email_validator accepts), or quoted.
_EMAIL = re.compile(r"(?:\"[^\"\n]*\"|[\w.!#$%&'*+/=?^`{|}~-]+)@[\w-]+(?:\.[\w-]+)+")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\w)")
# Candidates only; ipaddress decides (so "15:36:44" stays a time of day).
_IPV6 = re.compile(
    r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})(?![\w:])"
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# Invite tokens, session ids, tickets: long runs of URL-safe characters that
# mix letters and digits, or (32 and more) small and capital letters: one
# secrets.token_urlsafe(32) in 1,500 has no digit. Pseudonymous UUIDs are
# allowed and kept.
_TOKEN = re.compile(
    r"(?<![\w-])(?:(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[\w-]{20,}"
    r"|(?=[\w-]*[a-z])(?=[\w-]*[A-Z])[\w-]{32,})(?![\w-])"
)
# One-time codes are 6 to 8 digits standing alone (a trailing full stop is
# punctuation; a decimal point followed by digits is not), and not the first
# group of a UUID (kept, as above).
_CODE = re.compile(r"(?<![\w.])\d{6,8}(?!\w|[.,]\d|-[0-9a-fA-F]{4}-)")
# Header lines that carry credentials: everything after the name goes.
_CREDENTIAL_HEADER = re.compile(
    r"(?i)\b(authorization|proxy-authorization|cookie|set-cookie)(\s*[:=]\s*)[^\n]*"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic|digest)\s+[\w.~+/=-]{8,}")
# key=value and key: value in free text, where the key names a secret.
_SECRET_PAIR = re.compile(
    r"(?i)\b([\w-]*(?:password|passwd|secret|token|ticket|session|totp|otp|e-?mail)[\w-]*)"
    r"(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s&;,]+)"
)


def mask_text(text: str) -> str:
    """Return ``text`` with IP and e-mail addresses, tokens and codes masked."""
    text = _CREDENTIAL_HEADER.sub(r"\1\2[redacted]", text)
    text = _BEARER.sub(r"\1 [redacted]", text)
    text = _SECRET_PAIR.sub(r"\1\2[redacted]", text)
    # %40 is "@" in a URL: an address in a query string is still an address.
    text = _EMAIL.sub("[email]", text.replace("%40", "@"))
    text = _IPV4.sub(_mask_ip, text)
    text = _IPV6.sub(_mask_ip, text)
    text = _TOKEN.sub(_mask_token, text)
    return _CODE.sub("[code]", text)


def _mask_ip(match: re.Match[str]) -> str:
    candidate = match.group(0)
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return candidate
    # The server's own loopback and wildcard addresses say nothing about anyone.
    if address.is_loopback or address.is_unspecified:
        return candidate
    return "[ip]"


def mask_code(text: str) -> str:
    """Return source code with the e-mail and IP addresses written in it masked.

    Nothing else: a name is not a value, so ``session = find_session(token)``
    and ``cookie = request.cookies`` stay as they are, and so do long names
    with digits and numbers of six digits, which in text would pass for tokens
    and codes.
    """
    text = _EMAIL.sub("[email]", text)
    text = _IPV4.sub(_mask_ip, text)
    return _IPV6.sub(_mask_ip_in_code, text)


def _mask_ip_in_code(match: re.Match[str]) -> str:
    # "::2" in ``values[::2]`` is a slice, not an address: in code, an IPv6
    # address is taken to have two groups at least.
    if sum(1 for group in match.group(0).split(":") if group) < 2:
        return match.group(0)
    return _mask_ip(match)


def _mask_token(match: re.Match[str]) -> str:
    candidate = match.group(0)
    return candidate if _UUID.fullmatch(candidate) else "[token]"


def is_sensitive_key(key: str) -> bool:
    """Say whether a value logged under ``key`` is personal data by its name."""
    lowered = key.lower().replace("-", "_")
    if lowered in FRAMEWORK_KEYS:
        return False
    return lowered in SENSITIVE_KEYS or any(
        part in SENSITIVE_KEY_PARTS for part in lowered.split("_")
    )


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, Mapping):
        return {
            mask_text(str(key)): REDACTED if is_sensitive_key(str(key)) else _scrub(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(item) for item in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Anything else (an exception, a request, a URL object) is logged by its
    # text, so mask that text.
    return mask_text(str(value))


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def format_traceback(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> str:
    """Return the traceback as Python prints it, with what the exceptions say
    masked (:func:`mask_text`) and the frames' code left as it is.

    Built from its parts, not masked as text: the frames (file, line,
    function, source line) come from the program's files, so ``session =
    find_session(token)`` is code to keep (only addresses written in it are
    masked, :func:`mask_code`), while a message is a value even where it
    looks like a frame.
    """
    return "".join(_traceback_parts(traceback.TracebackException(exc_type, exc, tb)))


def _traceback_parts(exc: traceback.TracebackException) -> Iterator[str]:
    # The order and the words of traceback.TracebackException.format().
    if exc.__cause__ is not None:
        yield from _traceback_parts(exc.__cause__)
        yield _CAUSE
    elif exc.__context__ is not None and not exc.__suppress_context__:
        yield from _traceback_parts(exc.__context__)
        yield _CONTEXT
    if exc.stack:
        yield "Traceback (most recent call last):\n"
        for frame in exc.stack.format():
            yield mask_code(frame)
    for line in exc.format_exception_only():
        yield mask_text(line)
    # An exception group's members, each indented under its number.
    for number, member in enumerate(exc.exceptions or (), start=1):
        yield f"+---------------- {number} ----------------\n"
        yield textwrap.indent("".join(_traceback_parts(member)), "| ")


_render_exception = structlog.processors.ExceptionRenderer(
    lambda exc_info: format_traceback(*exc_info)
)


def redact_personal_data(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: drop sensitive keys, mask personal data in the rest,
    and render an exception (``exc_info``) with :func:`format_traceback`."""
    exc_info = event_dict.pop("exc_info", None)
    for key in list(event_dict):
        if key.startswith("_"):
            continue  # structlog's own bookkeeping (the stdlib record)
        if is_sensitive_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(event_dict[key])
    if exc_info is not None:
        event_dict["exc_info"] = exc_info
        event_dict = _render_exception(logger, method, event_dict)
    return event_dict


class ClientFaultFilter(logging.Filter):
    """Turn aiohttp's report of a malformed request into one line at INFO.

    aiohttp logs a request it cannot parse (a bad request line, header or
    Content-Length, a broken chunk) and a body it cannot decode, when it
    drains one after the answer, as an error with a traceback. They are the
    client's fault, answered with 400, and anyone can send them by the
    thousand: one line naming the error, without a traceback, and only when
    INFO is logged at all.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        # Here, not at the top: the command line logs without aiohttp loaded
        # (in the server it is, and these cost a lookup).
        from aiohttp.http_exceptions import HttpProcessingError
        from aiohttp.web_protocol import RequestPayloadError

        if isinstance(error, HttpProcessingError) and 400 <= error.code < 500:
            status = error.code
        elif isinstance(error, RequestPayloadError):
            status = 400
        else:
            return True
        # The logger's level was checked at ERROR; check it again at INFO.
        if not logging.getLogger(record.name).isEnabledFor(logging.INFO):
            return False
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        # The type only: the messages of some of them quote the request.
        record.msg, record.args = (
            "malformed request refused: %s (%d)",
            (
                type(error).__name__,
                status,
            ),
        )
        record.exc_info, record.exc_text = None, None
        return True


class SubprotocolFilter(logging.Filter):
    """Turn aiohttp's warning of a client's WebSocket subprotocols into one
    line without them.

    The server speaks no subprotocol. aiohttp warns of every socket whose
    client offers some (``Sec-WebSocket-Protocol``) with the client's address
    and its offer as sent: text a client chooses, which the masking cannot
    tell from a name. The socket goes on without one, as RFC 6455 has it;
    one line at INFO says so, without the client's values.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "overlap server-known" not in str(record.msg):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.INFO):
            return False
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        record.msg = "a client offered WebSocket subprotocols; none is spoken here, none was chosen"
        record.args = None
        return True


def configure_process_logging(
    *,
    level: str,
    log_format: Literal["json", "console"],
    stream: TextIO | None = None,
) -> None:
    """Send structlog and stdlib logging through one redacting chain to ``stream``.

    ``stream`` defaults to stdout. Call once at start-up (the CLI does).
    """
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=bool(getattr(stream or sys.stdout, "isatty", lambda: False)()),
            exception_formatter=structlog.dev.plain_traceback,
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # It renders tracebacks too: their code kept, their values masked.
            redact_personal_data,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Python's warnings as log records of the logger "py.warnings", through
    # the same masking, not to stderr as they are. (Off first: turning it on
    # again is a no-op for logging even when something has put warnings'
    # own display back meanwhile, as pytest does after each test.)
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    # aiohttp's own request log (its "access log") prints client addresses and
    # full paths (with invite tokens); server.request_log replaces it.
    logging.getLogger("aiohttp.access").disabled = True
    server_log = logging.getLogger("aiohttp.server")
    for old_filter in [f for f in server_log.filters if isinstance(f, ClientFaultFilter)]:
        server_log.removeFilter(old_filter)
    server_log.addFilter(ClientFaultFilter())
    websocket_log = logging.getLogger("aiohttp.websocket")
    for old_subprotocols in [f for f in websocket_log.filters if isinstance(f, SubprotocolFilter)]:
        websocket_log.removeFilter(old_subprotocols)
    websocket_log.addFilter(SubprotocolFilter())
    # These log every SQL statement with its parameters at debug level:
    # addresses, hashes, names. Never, whatever the level.
    for chatty in ("aiosqlite", "sqlalchemy.engine", "sqlalchemy.pool", "asyncpg"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # Alembic narrates every look at the schema; the CLI reports the outcome.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # The recorder's peers: aioice narrates every ICE check with the
    # participants' addresses and ports (masked, but a dozen lines per
    # recording); connection diagnostics belong in the technical log.
    for media in ("aioice", "aiortc"):
        logging.getLogger(media).setLevel(logging.WARNING)

    structlog.configure(
        # A line below the level is dropped first, before its processors run
        # (the time stamp, the context): otherwise the stdlib logger drops it
        # only after all of them.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
