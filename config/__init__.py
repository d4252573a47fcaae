"""Settings for videoconsult: TOML defaults, a site file, environment overrides.

Exports :class:`Settings` (one frozen, typed object), :func:`load_settings`
and :class:`SettingsError`, whose message is a single line naming the bad
setting and what is allowed.
"""

from config.settings import (
    AccountSettings,
    ConsultSettings,
    DatabaseSettings,
    LoggingSettings,
    Mode,
    RedisSettings,
    SecuritySettings,
    ServerSettings,
    SessionSettings,
    Settings,
    SettingsError,
    SignalingSettings,
    TurnSettings,
    env_var_names,
    load_settings,
)

__all__ = [
    "AccountSettings",
    "ConsultSettings",
    "DatabaseSettings",
    "LoggingSettings",
    "Mode",
    "RedisSettings",
    "SecuritySettings",
    "ServerSettings",
    "SessionSettings",
    "Settings",
    "SettingsError",
    "SignalingSettings",
    "TurnSettings",
    "env_var_names",
    "load_settings",
]
