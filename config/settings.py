"""Load and validate the settings: defaults, then a site file, then the environment.

The defaults live in ``config/defaults.toml``; every key must appear there.
``VIDEOCONSULT_CONFIG_FILE`` may name a site TOML file that overrides some of
them, and ``VIDEOCONSULT_<SECTION>_<KEY>`` (or ``VIDEOCONSULT_<KEY>`` for a
top-level key) overrides both. The result is one frozen :class:`Settings`.

Any problem raises :class:`SettingsError` with one line that names the
setting, where the bad value came from and what is allowed.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import enum
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from config.section import Section as _Section
from config.smtp import SmtpSettings
from config.webhooks import WebhookSettings

DEFAULTS_FILE = Path(__file__).with_name("defaults.toml")
ENV_PREFIX = "VIDEOCONSULT_"
CONFIG_FILE_ENV = "VIDEOCONSULT_CONFIG_FILE"
# Variables with the prefix that are not settings: they steer loading itself,
# or belong to the test suite.
RESERVED_ENV = frozenset({CONFIG_FILE_ENV})
RESERVED_ENV_PREFIXES = ("VIDEOCONSULT_TEST_",)
MASTER_KEY_BYTES = 32
# A shorter bearer token for /metrics could be guessed.
METRICS_TOKEN_MIN_CHARS = 16


class SettingsError(ValueError):
    """A setting is unknown, missing or has a value that is not allowed."""


class Mode(enum.Enum):
    # Plain HTTP on localhost, console logs, a generated master key allowed.
    DEVELOPMENT = "development"
    # JSON logs, a configured master key required.
    PRODUCTION = "production"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: str) -> tuple[Network, ...]:
    """Parse a comma-separated list of addresses or networks ("10.0.0.0/8, ::1");
    raise ValueError naming the first part that is neither."""
    networks: list[Network] = []
    for part in filter(None, (item.strip() for item in value.split(","))):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not an address or network") from None
    return tuple(networks)


class ServerSettings(_Section):
    host: str
    port: int = Field(ge=1, le=65535)
    public_url: str
    trusted_proxies: str
    max_body_bytes: int = Field(ge=1024, le=16 * 1024 * 1024)
    shutdown_timeout_s: float = Field(gt=0, le=300)
    request_timeout_s: float = Field(ge=1, le=300)

    @field_validator("host")
    @classmethod
    def _host_not_blank(cls, host: str) -> str:
        if not host.strip() or host != host.strip():
            raise ValueError("must be a host name or address without spaces")
        return host

    @field_validator("public_url")
    @classmethod
    def _origin_only(cls, url: str) -> str:
        if not url:
            return url
        match = re.fullmatch(r"(https?)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?/?", url)
        if match is None:
            raise ValueError(
                "must be empty or an origin such as https://video.clinic.example "
                "(http or https, a host, an optional port, no path)"
            )
        return url.rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)
        return value

    @property
    def trusted_proxy_networks(self) -> tuple[Network, ...]:
        return parse_networks(self.trusted_proxies)

    @property
    def public_origin(self) -> str | None:
        """The configured origin (scheme://host[:port]), or None."""
        return self.public_url or None

    @property
    def behind_tls(self) -> bool:
        return self.public_url.startswith("https://")


class AccountSettings(_Section):
    argon2_time_cost: int = Field(ge=1, le=20)
    argon2_memory_kib: int = Field(ge=8, le=4 * 1024 * 1024)
    argon2_parallelism: int = Field(ge=1, le=64)
    password_min_length: int = Field(ge=12, le=128)
    enrolment_link_ttl_s: int = Field(ge=60, le=30 * 86400)
    max_failures: int = Field(ge=1, le=100)
    failure_window_s: int = Field(ge=1, le=86400)
    lockout_s: int = Field(ge=1, le=86400)
    client_max_failures: int = Field(ge=1, le=10000)


class SessionSettings(_Section):
    idle_timeout_s: int = Field(ge=60, le=86400)
    absolute_timeout_s: int = Field(ge=60, le=7 * 86400)
    # How often therapists' consult sockets are checked against their login
    # sessions (closed when it ended, kept alive otherwise): well inside the
    # shortest idle timeout.
    socket_check_s: float = Field(ge=1, le=30)

    @model_validator(mode="after")
    def _idle_within_absolute(self) -> SessionSettings:
        if self.idle_timeout_s > self.absolute_timeout_s:
            raise ValueError("sessions.idle_timeout_s must not exceed sessions.absolute_timeout_s")
        return self


class DatabaseSettings(_Section):
    url: str
    migrate_on_start: bool
    connect_timeout_s: float = Field(gt=0, le=120)
    # audit/pace.py: 1 is full speed.
    bulk_share: float = Field(gt=0, le=1)

    @field_validator("url")
    @classmethod
    def _known_driver(cls, url: str) -> str:
        allowed = ("sqlite+aiosqlite://", "postgresql+asyncpg://")
        if not url:
            return url
        if not url.startswith(allowed):
            raise ValueError(
                "must be empty (SQLite in data_dir) or start with "
                "sqlite+aiosqlite:// or postgresql+asyncpg://"
            )
        try:
            parsed = make_url(url)
            port = parsed.port  # parsing the port is lazy; a bad one raises here
        except (ValueError, ArgumentError):
            raise ValueError("is not a valid database URL") from None
        if port is not None and not 1 <= port <= 65535:
            raise ValueError("has a port outside 1-65535")
        if parsed.query:
            # asyncpg takes none of libpq's URL options (sslmode=...); a
            # silently ignored one would be worse than this refusal.
            raise ValueError(
                "must not carry query arguments such as ?sslmode=; the driver does not take them"
            )
        return url


class RedisSettings(_Section):
    url: str
    connect_timeout_s: float = Field(gt=0, le=60)
    # Every key and channel this service uses starts with it: several
    # deployments (or test runs) can share one Redis without colliding.
    key_prefix: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "must be empty (no Redis) or start with redis://, rediss:// or unix://"
            )
        return url


class SecuritySettings(_Section):
    master_key: SecretStr
    client_requests_per_min: int = Field(ge=0, le=1_000_000)

    @field_validator("master_key")
    @classmethod
    def _thirty_two_bytes(cls, key: SecretStr) -> SecretStr:
        raw = key.get_secret_value()
        if raw and len(_decode_key(raw)) != MASTER_KEY_BYTES:
            raise ValueError(f"must decode to exactly {MASTER_KEY_BYTES} bytes")
        return key

    def master_key_bytes(self) -> bytes | None:
        """Return the configured master key, or None when none is set."""
        raw = self.master_key.get_secret_value()
        return _decode_key(raw) if raw else None


class ConsultSettings(_Section):
    invite_validity_s: int = Field(ge=60, le=90 * 86400)
    max_duration_s: int = Field(ge=60, le=86400)
    grace_s: int = Field(ge=1, le=600)
    ticket_ttl_s: int = Field(ge=5, le=600)
    waiting_room_opens_before_s: int = Field(ge=0, le=7 * 86400)


class RetentionSettings(_Section):
    consult_days: int = Field(ge=1, le=36500)
    recording_days: int = Field(ge=1, le=36500)
    access_log_days: int = Field(ge=1, le=36500)
    purge_interval_s: int = Field(ge=60, le=7 * 86400)


class SignalingSettings(_Section):
    heartbeat_s: float = Field(ge=1, le=300)
    rate_per_s: float = Field(gt=0, le=10000)
    burst: int = Field(ge=1, le=100000)
    max_refused: int = Field(ge=1, le=100000)


def _url_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


class TurnSettings(_Section):
    stun_urls: str
    turn_urls: str
    secret: SecretStr
    credential_ttl_s: int = Field(ge=60, le=7 * 86400)

    @field_validator("stun_urls")
    @classmethod
    def _stun(cls, value: str) -> str:
        for url in _url_list(value):
            if not url.startswith(("stun:", "stuns:")):
                raise ValueError(f"{url!r} is not a stun: or stuns: URL")
        return value

    @field_validator("turn_urls")
    @classmethod
    def _turn(cls, value: str) -> str:
        for url in _url_list(value):
            if not url.startswith(("turn:", "turns:")):
                raise ValueError(f"{url!r} is not a turn: or turns: URL")
        return value

    @model_validator(mode="after")
    def _secret_with_turn(self) -> TurnSettings:
        if self.turn_urls and not self.secret.get_secret_value():
            raise ValueError("turn.turn_urls needs turn.secret (coturn's static-auth-secret)")
        return self

    @property
    def stun_url_list(self) -> list[str]:
        return _url_list(self.stun_urls)

    @property
    def turn_url_list(self) -> list[str]:
        return _url_list(self.turn_urls)


class RecordingSettings(_Section):
    enabled: bool
    start_timeout_s: float = Field(ge=1, le=120)
    max_concurrent: int = Field(ge=1, le=1000)
    loop_slice_us: int = Field(ge=0, le=100_000)
    loop_realtime: bool

    @field_validator("loop_slice_us")
    @classmethod
    def _a_slice_linux_grants(cls, slice_us: int) -> int:
        # Linux clamps a slice to 0.1 .. 100 ms; 0 asks for none.
        if 0 < slice_us < 100:
            raise ValueError("must be 0 (the kernel's default) or 100 to 100000 µs")
        return slice_us


class MetricsSettings(_Section):
    enabled: bool
    allowed_networks: str
    token: SecretStr

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)
        return value

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr) -> SecretStr:
        raw = token.get_secret_value()
        if raw and (len(raw) < METRICS_TOKEN_MIN_CHARS or raw != raw.strip()):
            raise ValueError(
                f"must be empty or at least {METRICS_TOKEN_MIN_CHARS} characters "
                "without surrounding spaces"
            )
        return token

    @property
    def networks(self) -> tuple[Network, ...]:
        return parse_networks(self.allowed_networks)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"]
    format: Literal["auto", "json", "console"]
    technical_log_max_rows: int = Field(ge=1000, le=100_000_000)
    loop_stall_warning_ms: int = Field(ge=10, le=60_000)


class Settings(_Section):
    mode: Mode
    data_dir: Path
    server: ServerSettings
    database: DatabaseSettings
    redis: RedisSettings
    security: SecuritySettings
    accounts: AccountSettings
    sessions: SessionSettings
    consults: ConsultSettings
    smtp: SmtpSettings
    webhooks: WebhookSettings
    retention: RetentionSettings
    signaling: SignalingSettings
    turn: TurnSettings
    recording: RecordingSettings
    metrics: MetricsSettings
    logging: LoggingSettings

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir_not_blank(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a directory; it is empty")
        return value

    @model_validator(mode="after")
    def _production_needs_master_key(self) -> Settings:
        if self.mode is Mode.PRODUCTION and self.security.master_key_bytes() is None:
            raise ValueError(
                "production mode needs a master key: set security.master_key "
                f"({ENV_PREFIX}SECURITY_MASTER_KEY) to {MASTER_KEY_BYTES} random bytes, "
                "URL-safe base64"
            )
        if self.mode is Mode.PRODUCTION and not self.server.public_url:
            raise ValueError(
                "production mode needs server.public_url "
                f"({ENV_PREFIX}SERVER_PUBLIC_URL), the address people use, e.g. "
                "https://video.clinic.example"
            )
        return self

    @property
    def is_production(self) -> bool:
        return self.mode is Mode.PRODUCTION

    @property
    def log_format(self) -> Literal["json", "console"]:
        if self.logging.format == "auto":
            return "json" if self.is_production else "console"
        return self.logging.format


def _decode_key(raw: str) -> bytes:
    try:
        return base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError("must be URL-safe base64") from err


@dataclass(frozen=True)
class _Value:
    value: Any
    source: str


# Settings that once existed and mean nothing now: accepted (and ignored) in
# a site file or the environment, so that an installation that set them
# still starts. Each says why it went (docs/configuration.md, "Retired").
RETIRED_SETTINGS = {
    "recording.video_width": "the recorder copies the browsers' pictures unchanged (issue 18)",
    "recording.video_height": "the recorder copies the browsers' pictures unchanged (issue 18)",
}


def load_settings(
    environ: Mapping[str, str] | None = None, *, defaults_file: Path = DEFAULTS_FILE
) -> Settings:
    """Build the settings from the defaults file, a site file and ``environ``.

    ``environ`` defaults to ``os.environ``. Raises :class:`SettingsError`.
    """
    env = os.environ if environ is None else environ
    defaults = _read_toml(defaults_file)
    values = _flatten(defaults, source=str(defaults_file))
    known = set(values)

    site_file = env.get(CONFIG_FILE_ENV, "")
    if site_file:
        site = _flatten(_read_toml(Path(site_file)), source=site_file)
        for key, value in site.items():
            if key in RETIRED_SETTINGS:
                continue
            if key not in known:
                raise SettingsError(f"unknown setting {key!r} in {site_file}{_suggest(key, known)}")
            values[key] = value

    env_names = env_var_names(known)
    retired_names = env_var_names(set(RETIRED_SETTINGS))
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or _reserved(name) or name in retired_names:
            continue
        setting = env_names.get(name)
        if setting is None:
            hint = _suggest(name, env_names)
            raise SettingsError(f"unknown environment variable {name}{hint}")
        values[setting] = _Value(raw, f"environment variable {name}")

    for key, item in values.items():
        if not item.source.startswith("environment variable"):
            _check_toml_type(key, item)
    values["data_dir"] = _resolved_data_dir(values["data_dir"], defaults_file, site_file)
    try:
        return Settings.model_validate(_nest({k: v.value for k, v in values.items()}))
    except ValidationError as err:
        raise SettingsError(_describe(err, values)) from None


def _resolved_data_dir(item: _Value, defaults_file: Path, site_file: str) -> _Value:
    """``data_dir`` made absolute once, so that no command finds another
    directory (and makes a second database) because it ran elsewhere: a
    relative path in the defaults is the project's (the directory that holds
    ``config/``), in a site file that file's directory's, in the environment
    the working directory's at start."""
    if not isinstance(item.value, str) or not item.value.strip():
        return item  # the validator names the problem
    path = Path(item.value).expanduser()
    if path.is_absolute():
        # "~/videoconsult" as the user's home holds it: a check for the
        # database that took "~" as a directory name found none.
        return _Value(str(path), item.source)
    if item.source == str(defaults_file):
        base = defaults_file.absolute().parent.parent
    elif site_file and item.source == site_file:
        base = Path(site_file).absolute().parent
    else:
        base = Path.cwd()
    return _Value(str(base / path), item.source)


def env_var_names(keys: set[str] | None = None) -> dict[str, str]:
    """Map each ``VIDEOCONSULT_*`` variable name to its dotted setting key.

    Raises :class:`SettingsError` if two keys would share one name.
    """
    if keys is None:
        keys = set(_flatten(_read_toml(DEFAULTS_FILE), source=""))
    names: dict[str, str] = {}
    for key in sorted(keys):
        name = ENV_PREFIX + key.replace(".", "_").upper()
        if name in names:
            raise SettingsError(f"settings {names[name]} and {key} would share {name}")
        names[name] = key
    return names


def _field_type(key: str) -> Any:
    model: Any = Settings
    *sections, leaf = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    field = model.model_fields.get(leaf)
    return None if field is None else field.annotation


def _check_toml_type(key: str, item: _Value) -> None:
    """TOML values carry their own type; take them only in the field's type.

    (Environment variables are text and are converted by the model.)
    """
    expected = _field_type(key)
    value = item.value
    if expected is bool:
        ok = isinstance(value, bool)
        wanted = "true or false"
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        wanted = "a whole number"
    elif expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        wanted = "a number"
    elif expected == tuple[int, ...]:
        ok = isinstance(value, list) and all(
            isinstance(item, int) and not isinstance(item, bool) for item in value
        )
        wanted = "a list of whole numbers, e.g. [8443]"
    else:
        ok = isinstance(value, str)
        wanted = "a text in quotes"
    if not ok:
        raise SettingsError(
            f"invalid setting {key} = {value!r} from {item.source}: must be {wanted}"
        )


def _reserved(name: str) -> bool:
    return name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as err:
        raise SettingsError(f"cannot read settings file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"settings file {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"settings file {path} is not UTF-8 text") from None


def _flatten(table: Mapping[str, Any], *, source: str, prefix: str = "") -> dict[str, _Value]:
    flat: dict[str, _Value] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, source=source, prefix=f"{dotted}."))
        else:
            flat[dotted] = _Value(value, source)
    return flat


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *sections, leaf = dotted.split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value
    return nested


def _suggest(name: str, candidates: Mapping[str, Any] | set[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _hide_password(value: Any) -> Any:
    """Mask the password of a URL such as ``postgresql+asyncpg://user:pw@host/db``."""
    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        return make_url(value).render_as_string(hide_password=True)
    except (ValueError, ArgumentError):
        # Unparseable: keep the scheme only, rather than risk showing a password.
        return value.split("://", 1)[0] + "://(hidden)"


def _describe(err: ValidationError, values: Mapping[str, _Value]) -> str:
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    if not loc or any(key.startswith(f"{loc}.") for key in values):
        # A rule over several settings (production needs a key) names them itself.
        return f"invalid settings: {message}"
    if loc not in values:
        return f"invalid setting {loc}: {message} (missing from {DEFAULTS_FILE.name}?)"
    origin = values[loc]
    hidden = any(word in loc for word in ("key", "secret", "token"))
    shown = "(hidden)" if hidden else repr(_hide_password(origin.value))
    return f"invalid setting {loc} = {shown} from {origin.source}: {message}"
