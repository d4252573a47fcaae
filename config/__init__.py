"""Settings for videoconsult: TOML defaults, a site file, environment overrides.

Exports :class:`Settings` (one frozen, typed object), :func:`load_settings`
and :class:`SettingsError`, whose message is a single line naming the bad
setting and what is allowed.
"""

from config.settings import (
    DatabaseSettings,
    LoggingSettings,
    Mode,
    RedisSettings,
    SecuritySettings,
    ServerSettings,
    Settings,
    SettingsError,
    env_var_names,
    load_settings,
)

__all__ = [
    "DatabaseSettings",
    "LoggingSettings",
    "Mode",
    "RedisSettings",
    "SecuritySettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "env_var_names",
    "load_settings",
]
