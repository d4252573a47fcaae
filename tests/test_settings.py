"""Settings: defaults from TOML, a site file, environment overrides, one clear error."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pydantic
import pytest

from config import Mode, Settings, SettingsError, env_var_names, load_settings
from config.settings import DEFAULTS_FILE

GOOD_KEY = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def load_error(environ: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    message = str(caught.value)
    assert "\n" not in message, "a settings error is one line"
    return message


def test_defaults_file_gives_a_development_server_on_loopback() -> None:
    settings = load_settings({})
    assert settings.mode is Mode.DEVELOPMENT
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8080
    assert settings.database.url == ""
    assert settings.redis.url == ""
    assert settings.log_format == "console"


def test_environment_variables_override_defaults_with_types_converted() -> None:
    settings = load_settings(
        {
            "VIDEOCONSULT_SERVER_PORT": "9000",
            "VIDEOCONSULT_DATABASE_MIGRATE_ON_START": "false",
            "VIDEOCONSULT_DATA_DIR": "/srv/vc",
            "VIDEOCONSULT_DATABASE_URL": "postgresql+asyncpg://vc@db:5432/vc",
        }
    )
    assert settings.server.port == 9000
    assert settings.database.migrate_on_start is False
    assert settings.data_dir == Path("/srv/vc")
    assert settings.database.url.startswith("postgresql+asyncpg://")


def test_site_file_overrides_defaults_and_environment_overrides_site_file(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[server]\nport = 8181\nhost = "127.0.0.2"\n[logging]\nlevel = "debug"\n')
    settings = load_settings(
        {"VIDEOCONSULT_CONFIG_FILE": str(site), "VIDEOCONSULT_SERVER_PORT": "8282"}
    )
    assert settings.server.host == "127.0.0.2"
    assert settings.logging.level == "debug"
    assert settings.server.port == 8282


def test_unknown_environment_variable_is_refused_with_a_suggestion() -> None:
    message = load_error({"VIDEOCONSULT_SERVER_PROT": "9000"})
    assert "unknown environment variable VIDEOCONSULT_SERVER_PROT" in message
    assert "did you mean VIDEOCONSULT_SERVER_PORT?" in message


def test_unrelated_environment_variables_are_ignored() -> None:
    settings = load_settings({"HOME": "/root", "VIDEOCONSULT_TEST_POSTGRES_URL": "x"})
    assert settings.server.port == 8080


def test_unknown_key_in_site_file_is_refused(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text("[server]\nprot = 1\n")
    message = load_error({"VIDEOCONSULT_CONFIG_FILE": str(site)})
    assert f"unknown setting 'server.prot' in {site}" in message
    assert "server.port" in message


def test_retired_recording_size_settings_still_load_and_mean_nothing(tmp_path: Path) -> None:
    """The transcoding recorder's picture size (gone with issue 18): an
    installation that set it still starts."""
    site = tmp_path / "site.toml"
    site.write_text("[recording]\nvideo_width = 1280\nvideo_height = 720\n")
    settings = load_settings(
        {
            "VIDEOCONSULT_CONFIG_FILE": str(site),
            "VIDEOCONSULT_RECORDING_VIDEO_WIDTH": "640",
            "VIDEOCONSULT_RECORDING_VIDEO_HEIGHT": "480",
        }
    )
    assert not hasattr(settings.recording, "video_width")
    assert "VIDEOCONSULT_RECORDING_VIDEO_WIDTH" not in env_var_names()


def test_site_file_that_is_not_toml_is_named(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text("[server\nport = 1\n")
    assert f"settings file {site} is not valid TOML" in load_error(
        {"VIDEOCONSULT_CONFIG_FILE": str(site)}
    )


def test_missing_site_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert f"cannot read settings file {missing}" in load_error(
        {"VIDEOCONSULT_CONFIG_FILE": str(missing)}
    )


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("VIDEOCONSULT_SERVER_PORT", "70000", "less than or equal to 65535"),
        ("VIDEOCONSULT_SERVER_PORT", "0", "greater than or equal to 1"),
        ("VIDEOCONSULT_SERVER_PORT", "eighty", "valid integer"),
        ("VIDEOCONSULT_MODE", "prod", "'development' or 'production'"),
        ("VIDEOCONSULT_DATABASE_MIGRATE_ON_START", "maybe", "valid boolean"),
        ("VIDEOCONSULT_DATABASE_CONNECT_TIMEOUT_S", "-1", "greater than 0"),
        ("VIDEOCONSULT_LOGGING_LEVEL", "loud", "'debug', 'info', 'warning' or 'error'"),
        ("VIDEOCONSULT_DATABASE_URL", "mysql://db/vc", "postgresql+asyncpg://"),
        ("VIDEOCONSULT_REDIS_URL", "http://cache", "redis://"),
        # Keys and channels are "{prefix}:...": a colon or a glob character
        # in the prefix would reach another deployment's rooms.
        ("VIDEOCONSULT_REDIS_KEY_PREFIX", "vc:prod", "should match pattern"),
        ("VIDEOCONSULT_REDIS_KEY_PREFIX", "vc*", "should match pattern"),
        ("VIDEOCONSULT_REDIS_KEY_PREFIX", "", "at least 1 character"),
        # A claim that ends before the send's answer is recorded: sent twice.
        ("VIDEOCONSULT_WEBHOOKS_CLAIM_MARGIN_S", "0.5", "greater than or equal to 1"),
        ("VIDEOCONSULT_WEBHOOKS_CLAIM_MARGIN_S", "601", "less than or equal to 600"),
        # A check more often than a second is a query storm; rarer than 30 s
        # leaves a logged-out therapist's socket open too long.
        ("VIDEOCONSULT_SESSIONS_SOCKET_CHECK_S", "0", "greater than or equal to 1"),
        ("VIDEOCONSULT_SESSIONS_SOCKET_CHECK_S", "31", "less than or equal to 30"),
        ("VIDEOCONSULT_SESSIONS_SOCKET_CHECK_S", "often", "valid number"),
        # A bulk job that may never be busy never ends; more than all the time is none.
        ("VIDEOCONSULT_DATABASE_BULK_SHARE", "0", "greater than 0"),
        ("VIDEOCONSULT_DATABASE_BULK_SHARE", "1.5", "less than or equal to 1"),
    ],
)
def test_bad_value_names_the_setting_its_source_and_what_is_allowed(
    variable: str, value: str, expected: str
) -> None:
    message = load_error({variable: value})
    dotted = env_var_names()[variable]
    assert message.startswith(f"invalid setting {dotted} = ")
    assert f"from environment variable {variable}" in message
    assert expected in message


def test_wrong_type_in_site_file_names_the_file(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[server]\nport = "many"\n')
    message = load_error({"VIDEOCONSULT_CONFIG_FILE": str(site)})
    assert f"invalid setting server.port = 'many' from {site}" in message


def test_production_mode_without_master_key_is_refused() -> None:
    message = load_error({"VIDEOCONSULT_MODE": "production"})
    assert "production mode needs a master key" in message
    assert "VIDEOCONSULT_SECURITY_MASTER_KEY" in message


def test_production_mode_with_master_key_logs_json() -> None:
    settings = load_settings(
        {
            "VIDEOCONSULT_MODE": "production",
            "VIDEOCONSULT_SECURITY_MASTER_KEY": GOOD_KEY,
            "VIDEOCONSULT_SERVER_PUBLIC_URL": "https://video.clinic.example",
        }
    )
    assert settings.is_production
    assert settings.security.master_key_bytes() == base64.urlsafe_b64decode(GOOD_KEY)
    assert settings.log_format == "json"


@pytest.mark.parametrize(
    "bad_key",
    # A fixed id for the generated key: pytest-xdist's workers must collect the same tests.
    ["c2hvcnQ", "not base64 at all!", pytest.param(GOOD_KEY + "AAAA", id="36-bytes")],
)
def test_master_key_of_wrong_size_is_refused_and_never_shown(bad_key: str) -> None:
    message = load_error({"VIDEOCONSULT_SECURITY_MASTER_KEY": bad_key})
    assert "security.master_key" in message
    assert bad_key not in message
    assert "(hidden)" in message


def test_master_key_never_appears_in_the_settings_repr() -> None:
    settings = load_settings({"VIDEOCONSULT_SECURITY_MASTER_KEY": GOOD_KEY})
    assert GOOD_KEY not in repr(settings)
    assert GOOD_KEY not in str(settings)


def test_database_password_is_masked_in_errors() -> None:
    message = load_error({"VIDEOCONSULT_DATABASE_URL": "mysql://vc:s3cretpw@db/vc"})
    assert "s3cretpw" not in message
    assert "vc:***@db" in message


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(pydantic.ValidationError):
        settings.server.port = 1  # type: ignore[misc]


def test_every_setting_has_its_own_environment_name_and_a_default() -> None:
    names = env_var_names()
    keys = set(_flatten_defaults())
    assert len(names) == len(keys)
    assert set(names.values()) == keys
    assert "VIDEOCONSULT_DATABASE_URL" in names
    assert "VIDEOCONSULT_MODE" in names
    # Every field of the model is in the defaults file: nothing has a hidden default.
    assert isinstance(load_settings({}, defaults_file=DEFAULTS_FILE), Settings)


def test_defaults_file_missing_a_key_is_refused(tmp_path: Path) -> None:
    trimmed = tmp_path / "defaults.toml"
    text = DEFAULTS_FILE.read_text().replace("port = 8080\n", "")
    trimmed.write_text(text)
    with pytest.raises(SettingsError, match=r"server\.port.*Field required"):
        load_settings({}, defaults_file=trimmed)


def _flatten_defaults() -> list[str]:
    import tomllib

    def walk(table: dict[str, object], prefix: str = "") -> list[str]:
        keys = []
        for key, value in table.items():
            if isinstance(value, dict):
                keys += walk(value, f"{prefix}{key}.")
            else:
                keys.append(f"{prefix}{key}")
        return keys

    return walk(tomllib.loads(DEFAULTS_FILE.read_text()))


def test_two_settings_that_would_share_an_environment_name_are_refused() -> None:
    with pytest.raises(SettingsError, match="would share VIDEOCONSULT_SERVER_PORT"):
        env_var_names({"server.port", "server_port"})


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[server]\nport = true\n", "server.port = True from"),
        ("[server]\nport = 8080.0\n", "must be a whole number"),
        ('[database]\nmigrate_on_start = "false"\n', "must be true or false"),
        ("[server]\nhost = 5\n", "must be a text in quotes"),
    ],
)
def test_site_file_values_must_have_the_settings_type(
    tmp_path: Path, toml: str, expected: str
) -> None:
    site = tmp_path / "site.toml"
    site.write_text(toml)
    assert expected in load_error({"VIDEOCONSULT_CONFIG_FILE": str(site)})


def test_site_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_bytes(b'[server]\nhost = "\xff"\n')
    assert "is not UTF-8 text" in load_error({"VIDEOCONSULT_CONFIG_FILE": str(site)})


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("VIDEOCONSULT_DATA_DIR", "", "must name a directory"),
        ("VIDEOCONSULT_SERVER_HOST", " ", "without spaces"),
        (
            "VIDEOCONSULT_DATABASE_URL",
            "postgresql+asyncpg://vc@db:5432/vc?sslmode=require",
            "must not carry query arguments",
        ),
        ("VIDEOCONSULT_DATABASE_URL", "postgresql+asyncpg://vc@db:notaport/vc", "not a valid"),
        ("VIDEOCONSULT_SERVER_PUBLIC_URL", "https://video.example/path", "no path"),
        ("VIDEOCONSULT_SESSIONS_IDLE_TIMEOUT_S", "50000", "must not exceed"),
    ],
)
def test_blank_or_unusable_values_are_refused(variable: str, value: str, expected: str) -> None:
    assert expected in load_error({variable: value})


def test_passwords_with_slashes_or_at_signs_stay_hidden() -> None:
    message = load_error({"VIDEOCONSULT_DATABASE_URL": "mysql://vc:pa/ss@w@db/vc"})
    assert "pa/ss" not in message
    assert "ss@w" not in message


def test_production_mode_without_public_url_is_refused() -> None:
    message = load_error(
        {"VIDEOCONSULT_MODE": "production", "VIDEOCONSULT_SECURITY_MASTER_KEY": GOOD_KEY}
    )
    assert "production mode needs server.public_url" in message


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    ok = load_settings({"VIDEOCONSULT_SERVER_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8, ::1"})
    assert len(ok.server.trusted_proxy_networks) == 3
    assert "'proxy.local' is not an address" in load_error(
        {"VIDEOCONSULT_SERVER_TRUSTED_PROXIES": "10.0.0.1, proxy.local"}
    )


def test_a_relative_data_dir_is_resolved_once_and_not_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The defaults' "data" is the clone's own, wherever the command runs.
    assert load_settings(environ={}).data_dir == DEFAULTS_FILE.parent.parent / "data"
    # A site file's relative path is taken from the file's directory.
    site = tmp_path / "site" / "videoconsult.toml"
    site.parent.mkdir()
    site.write_text('data_dir = "store"\n')
    from_site = load_settings(environ={"VIDEOCONSULT_CONFIG_FILE": str(site)})
    assert from_site.data_dir == site.parent / "store"
    # An environment variable's, from the working directory at start (once).
    from_env = load_settings(environ={"VIDEOCONSULT_DATA_DIR": "mine"})
    assert from_env.data_dir == elsewhere / "mine"
    assert from_env.data_dir.is_absolute()
    # Found in review: "~" was expanded to test the path but kept as it was,
    # so `db current` looked for a directory named "~" and found no database.
    home = load_settings(environ={"VIDEOCONSULT_DATA_DIR": "~/videoconsult"})
    assert home.data_dir == Path.home() / "videoconsult"


def test_webhook_ports_come_as_a_toml_list_or_a_comma_separated_variable(tmp_path: Path) -> None:
    assert load_settings({}).webhooks.allowed_ports == ()
    site = tmp_path / "site.toml"
    site.write_text("[webhooks]\nallowed_ports = [8443, 9443]\n")
    from_file = load_settings({"VIDEOCONSULT_CONFIG_FILE": str(site)})
    assert from_file.webhooks.allowed_ports == (8443, 9443)
    from_env = load_settings({"VIDEOCONSULT_WEBHOOKS_ALLOWED_PORTS": " 8443,9443 "})
    assert from_env.webhooks.allowed_ports == (8443, 9443)
    none = load_settings({"VIDEOCONSULT_WEBHOOKS_ALLOWED_PORTS": ""})
    assert none.webhooks.allowed_ports == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", "0 is not a port"),
        ("65536", "65536 is not a port"),
        ("8443,https", "'https' is not a port"),
        ("8443,,9443", "'' is not a port"),
        ("8443,8443", "8443 is listed twice"),
    ],
)
def test_a_webhook_port_that_is_not_one_is_refused_naming_it(value: str, expected: str) -> None:
    message = load_error({"VIDEOCONSULT_WEBHOOKS_ALLOWED_PORTS": value})
    assert message.startswith("invalid setting webhooks.allowed_ports = ")
    assert expected in message


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[webhooks]\nallowed_ports = 8443\n", "must be a list of whole numbers"),
        ('[webhooks]\nallowed_ports = ["8443"]\n', "must be a list of whole numbers"),
        ("[webhooks]\nallowed_ports = [true]\n", "must be a list of whole numbers"),
        ("[webhooks]\nallowed_ports = [70000]\n", "70000 is not a port"),
    ],
)
def test_webhook_ports_in_a_site_file_must_be_whole_numbers(
    tmp_path: Path, toml: str, expected: str
) -> None:
    site = tmp_path / "site.toml"
    site.write_text(toml)
    message = load_error({"VIDEOCONSULT_CONFIG_FILE": str(site)})
    assert "webhooks.allowed_ports" in message
    assert expected in message
