"""docker-compose.yml, the Dockerfile, nginx's and coturn's configs fit together
and fit the settings.

No Docker engine runs where the tests run, so these tests read the files and
check their structure: the services and how they wait for each other, that
both nodes get one and the same environment, which names real settings and
passes validation, that only the proxy publishes a port, that nginx's
upstreams and the trusted proxies name the compose addresses, and that the
image and the volumes agree on paths and ports. tests/test_proxy.py runs the
nginx config for real.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from sqlalchemy.engine import make_url

from config import Mode, Settings, env_var_names, load_settings
from server.app_keys import SETTINGS
from server.web_security import client_address
from tests.support import ROOT
from tests.support.deploy import NGINX_CONF, nginx_directives, nginx_upstream_servers

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
NODES = ("server-a", "server-b")
# What every node must share (README, "Scaling out: several nodes").
SHARED_SETTINGS = (
    "database.url",
    "redis.url",
    "redis.key_prefix",
    "security.master_key",
    "turn.secret",
    "server.public_url",
    "server.trusted_proxies",
    "security.client_requests_per_min",
)

# Compose interpolation: ${NAME}, ${NAME:?message}, ${NAME:-default}, ...;
# "$$" is a literal dollar sign.
INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
)
# What an operator would put in .env; the master key is a valid 32-byte key.
PLACEHOLDERS = {
    "PUBLIC_URL": "https://video.clinic.example",
    "POSTGRES_PASSWORD": "placeholder-password",
    "MASTER_KEY": base64.urlsafe_b64encode(bytes(range(32))).decode(),
    "TURN_SECRET": "placeholder-turn-secret",
    "TURN_HOST": "turn.clinic.example",
}


def load_compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return compose


def service(name: str) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = load_compose()["services"]
    return services[name]


def environment(name: str) -> dict[str, str]:
    """A service's environment as a mapping, whichever of the two forms it uses."""
    env = service(name).get("environment", {})
    if isinstance(env, list):
        return dict(entry.split("=", 1) for entry in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Substitute ``${...}`` references the way docker compose does."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        value = variables.get(name)
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in ("?", ":?") and unset:
            raise KeyError(f"{name} is required: {arg}")
        if op in ("-", ":-") and unset:
            return arg
        return value or ""

    return INTERPOLATION.sub(replace, text)


def strings(node: Any) -> Iterator[str]:
    """Every string value in the parsed compose file, however deeply nested."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def references() -> list[re.Match[str]]:
    """Every ``${...}`` reference in the compose file's values (comments excluded)."""
    return [
        match
        for text in strings(load_compose())
        for match in INTERPOLATION.finditer(text)
        if match.group("name")
    ]


def interpolate_compose(variables: dict[str, str]) -> list[str]:
    """Interpolate every value of the compose file, as ``docker compose up`` does."""
    return [interpolate(text, variables) for text in strings(load_compose())]


def dockerfile_instructions(all_stages: bool = False) -> list[tuple[str, str]]:
    """The final stage's (or every stage's) instructions as (INSTRUCTION, arguments),
    continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM" and not all_stages:
            instructions = []
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_args(keyword: str, all_stages: bool = False) -> list[str]:
    return [arguments for name, arguments in dockerfile_instructions(all_stages) if name == keyword]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in dockerfile_args("ENV"):
        for pair in shlex.split(arguments):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def healthcheck_command(test: Any) -> list[str]:
    """The command of a compose ``healthcheck.test``; empty when there is none."""
    if isinstance(test, str):
        return shlex.split(test)
    if isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
        return [str(part) for part in test[1:]]
    return []


def coturn_config() -> dict[str, list[str]]:
    """turnserver.conf as option -> values (flags have the value "")."""
    volumes: list[str] = service("coturn")["volumes"]
    (source,) = [v.split(":")[0] for v in volumes if v.split(":")[1].endswith("turnserver.conf")]
    options: dict[str, list[str]] = {}
    for raw in (ROOT / source).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            options.setdefault(key.strip(), []).append(value.strip())
    return options


def server_environ(node: str) -> dict[str, str]:
    """A node container's environment: the image's ENV, then compose's."""
    environ = {k: v for k, v in dockerfile_env().items() if k.startswith("VIDEOCONSULT_")}
    environ.update({k: interpolate(v, PLACEHOLDERS) for k, v in environment(node).items()})
    return environ


def node_settings(node: str) -> Settings:
    return load_settings(server_environ(node))


def setting(settings: Settings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def container_port() -> str:
    """The port the image's server listens on."""
    cmd: list[str] = json.loads(dockerfile_args("CMD")[0])
    return cmd[cmd.index("--port") + 1]


def mounts(name: str) -> dict[str, tuple[str, list[str]]]:
    """A service's volumes as target -> (source, options)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for entry in service(name).get("volumes", []):
        source, target, *options = entry.split(":")
        found[target] = (source, options)
    return found


def address(name: str) -> ipaddress.IPv4Address:
    """A service's fixed address on the compose network."""
    return ipaddress.IPv4Address(service(name)["networks"]["default"]["ipv4_address"])


def network_config() -> dict[str, str]:
    (config,) = load_compose()["networks"]["default"]["ipam"]["config"]
    return {key: str(value) for key, value in config.items()}


def nginx_listen_port() -> str:
    (listen,) = nginx_directives("listen")
    return listen[0].rsplit(":", 1)[-1]


def test_compose_defines_two_nodes_a_proxy_postgres_redis_and_coturn() -> None:
    assert set(load_compose()["services"]) == {*NODES, "proxy", "postgres", "redis", "coturn"}


@pytest.mark.parametrize("node", NODES)
def test_node_is_built_from_the_dockerfile_in_the_project_root(node: str) -> None:
    build = service(node)["build"]
    context = build if isinstance(build, str) else build["context"]
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert context == "."
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE
    assert DOCKERFILE.is_file()


def test_both_nodes_run_the_same_image_with_the_same_environment() -> None:
    a, b = (service(node) for node in NODES)
    assert a["image"] == b["image"], "one version (and one set of migrations) on every node"
    assert a["build"] == b["build"]
    assert environment("server-a") == environment("server-b")


@pytest.mark.parametrize("dotted", SHARED_SETTINGS)
def test_both_nodes_share_the_settings_every_node_must_share(dotted: str) -> None:
    a, b = (setting(node_settings(node), dotted) for node in NODES)
    assert a == b
    assert a not in ("", None), f"{dotted} must be set, and the same, on every node"


def test_both_nodes_migrate_on_start_which_is_safe_because_migrations_take_a_lock() -> None:
    # Both may run migrations at once: audit/migrate.py takes PostgreSQL's
    # advisory lock; tests/test_proxy.py starts two nodes at once on an
    # empty database.
    migrate_source = (ROOT / "audit" / "migrate.py").read_text(encoding="utf-8")
    assert "pg_advisory_xact_lock" in migrate_source
    for node in NODES:
        assert node_settings(node).database.migrate_on_start


def test_every_service_has_a_healthcheck_command() -> None:
    for name, definition in load_compose()["services"].items():
        healthcheck = definition.get("healthcheck", {})
        assert not healthcheck.get("disable", False), f"{name}: healthcheck disabled"
        assert healthcheck_command(healthcheck.get("test")), f"{name}: no healthcheck command"


@pytest.mark.parametrize("node", NODES)
def test_node_waits_for_healthy_postgres_and_redis(node: str) -> None:
    depends_on = service(node)["depends_on"]
    assert isinstance(depends_on, dict), "the list form cannot wait for health"
    for dependency in ("postgres", "redis"):
        assert depends_on[dependency]["condition"] == "service_healthy"


@pytest.mark.parametrize("node", NODES)
def test_node_health_is_its_readiness_on_its_own_port(node: str) -> None:
    command = " ".join(healthcheck_command(service(node)["healthcheck"]["test"]))
    assert f"http://127.0.0.1:{container_port()}/readyz" in command
    assert "urllib" in command


def test_server_uses_postgresql_via_asyncpg_on_the_postgres_service() -> None:
    url = make_url(interpolate(environment("server-a")["VIDEOCONSULT_DATABASE_URL"], PLACEHOLDERS))
    postgres = environment("postgres")
    assert url.drivername == "postgresql+asyncpg"
    assert url.host == "postgres"
    assert url.port in (None, 5432)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.database == postgres["POSTGRES_DB"]
    # The same variable feeds the server's URL and PostgreSQL's password.
    assert url.password == interpolate(postgres["POSTGRES_PASSWORD"], PLACEHOLDERS)
    assert service("postgres")["image"].startswith("postgres:16")


def test_server_uses_the_redis_service() -> None:
    url = environment("server-a")["VIDEOCONSULT_REDIS_URL"]
    assert url.startswith("redis://redis:6379/")


def test_redis_keeps_nothing_on_disk() -> None:
    redis = service("redis")
    command = redis["command"]
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    assert redis["image"].startswith("redis:7")
    assert args[args.index("--save") + 1] == ""
    assert args[args.index("--appendonly") + 1] == "no"
    assert not redis.get("volumes")


def test_every_videoconsult_variable_in_compose_and_image_is_a_real_setting() -> None:
    known = env_var_names()
    for name, definition in load_compose()["services"].items():
        env = environment(name) if definition.get("environment") else {}
        unknown = [key for key in env if key.startswith("VIDEOCONSULT_") and key not in known]
        assert not unknown, f"{name}: no such settings: {unknown}"
    image_unknown = [
        key for key in dockerfile_env() if key.startswith("VIDEOCONSULT_") and key not in known
    ]
    assert not image_unknown, f"Dockerfile: no such settings: {image_unknown}"


@pytest.mark.parametrize("node", NODES)
def test_compose_node_environment_passes_settings_validation(node: str) -> None:
    settings = node_settings(node)
    assert settings.mode is Mode.PRODUCTION
    assert make_url(settings.database.url).get_backend_name() == "postgresql"
    assert settings.redis.url == "redis://redis:6379/0"
    assert settings.security.master_key_bytes() == bytes(range(32))
    assert settings.data_dir == Path("/var/lib/videoconsult")


def test_secrets_are_required_variables_listed_in_env_example() -> None:
    found = references()
    assert {match.group("name") for match in found} == set(PLACEHOLDERS)
    for match in found:
        assert match.group("op") == ":?", f"{match.group(0)}: compose must refuse to start"
    example = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    assert example == set(PLACEHOLDERS)
    for name in PLACEHOLDERS:
        for value in (None, ""):
            variables = {k: v for k, v in PLACEHOLDERS.items() if k != name}
            if value is not None:
                variables[name] = value
            with pytest.raises(KeyError, match=name):
                interpolate_compose(variables)


def test_each_node_has_a_named_data_volume_of_its_own_at_the_configured_data_dir() -> None:
    sources = []
    for node in NODES:
        data_dir = environment(node)["VIDEOCONSULT_DATA_DIR"]
        assert data_dir in mounts(node), f"{node}: nothing mounted at {data_dir}"
        source, _options = mounts(node)[data_dir]
        assert source in load_compose()["volumes"], "the data directory must be a named volume"
        sources.append(source)
        assert dockerfile_env()["VIDEOCONSULT_DATA_DIR"] == data_dir
        assert data_dir in json.loads(dockerfile_args("VOLUME")[0])
    assert len(set(sources)) == len(NODES), "a data volume per node"


def test_every_node_mounts_one_shared_recordings_volume_at_data_dir_recordings() -> None:
    # A recording is written on the node that records and downloaded from
    # whichever node the proxy picks.
    sources = set()
    for node in NODES:
        recordings = str(node_settings(node).data_dir / "recordings")
        assert recordings in mounts(node), f"{node}: nothing mounted at {recordings}"
        source, options = mounts(node)[recordings]
        assert "ro" not in options
        sources.add(source)
    (shared,) = sources
    assert shared in load_compose()["volumes"]


def test_the_image_owns_the_recordings_mount_point_so_a_fresh_volume_is_writable() -> None:
    # Docker gives a fresh named volume the owner and mode of the directory
    # it is mounted over; a mount point the image lacks becomes root's.
    recordings = str(node_settings("server-a").data_dir / "recordings")
    user = dockerfile_args("USER")[0].split(":")[0]
    created = [
        arguments
        for arguments in dockerfile_args("RUN")
        if "install -d" in arguments and recordings in arguments.split()
    ]
    assert created, f"the image does not create {recordings}"
    assert any(f"-o {name}" in created[0] for name in (user, "videoconsult"))
    assert "-m 0700" in created[0]


@pytest.mark.parametrize("node", NODES)
def test_nodes_publish_no_ports(node: str) -> None:
    assert not service(node).get("ports"), "the nodes are reached through the proxy only"
    assert service(node).get("network_mode") is None


def test_proxy_is_nginx_with_our_config_mounted_read_only() -> None:
    proxy = service("proxy")
    assert proxy["image"].split(":")[0] == "nginx"
    source, options = mounts("proxy")["/etc/nginx/nginx.conf"]
    assert (ROOT / source).resolve() == NGINX_CONF
    assert options == ["ro"]


def test_only_the_proxy_publishes_a_port_and_on_loopback_only() -> None:
    ports = service("proxy")["ports"]
    assert ports, "the proxy publishes its port for the TLS proxy in front"
    for entry in ports:
        host_ip, host_port, target = str(entry).rsplit(":", 2)
        assert host_ip == "127.0.0.1"
        assert host_port == "8080"
        assert target == nginx_listen_port()
    published = [name for name, s in load_compose()["services"].items() if s.get("ports")]
    assert published == ["proxy"]


def test_nginx_sends_requests_to_the_nodes_by_their_fixed_addresses() -> None:
    # By address, not by name: nginx resolves names once, at start, and
    # refuses to start while one (a stopped node) does not resolve.
    expected = [f"{address(node)}:{container_port()}" for node in NODES]
    assert nginx_upstream_servers() == expected


def test_fixed_addresses_lie_in_the_subnet_outside_the_range_docker_hands_out() -> None:
    config = network_config()
    subnet = ipaddress.IPv4Network(config["subnet"])
    dynamic = ipaddress.IPv4Network(config["ip_range"])
    gateway = ipaddress.IPv4Address(config["gateway"])
    fixed = [address(name) for name in (*NODES, "proxy")]
    assert len(set(fixed)) == len(fixed)
    for found in fixed:
        assert found in subnet
        assert found not in dynamic, "docker could give it to another container first"
        assert found != gateway


@pytest.mark.parametrize("node", NODES)
def test_nodes_trust_exactly_the_proxy_and_the_host_in_front_of_it(node: str) -> None:
    trusted = set(node_settings(node).server.trusted_proxy_networks)
    gateway = ipaddress.IPv4Address(network_config()["gateway"])
    assert trusted == {
        ipaddress.IPv4Network(address("proxy")),
        ipaddress.IPv4Network(gateway),
    }


def test_nodes_see_the_browsers_address_behind_the_host_proxy_and_nginx() -> None:
    # The browser reaches the TLS proxy on the host, which adds the browser's
    # address and connects to nginx's published port (from the gateway
    # address); nginx appends that one and connects to the node.
    app = web.Application()
    app[SETTINGS] = node_settings("server-a")
    peer = (str(address("proxy")), 40000)
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        peer if name == "peername" else default
    )
    forwarded = f"203.0.113.7, {network_config()['gateway']}"
    request = make_mocked_request(
        "POST", "/api/login", headers={"X-Forwarded-For": forwarded}, app=app, transport=transport
    )
    assert client_address(request) == "203.0.113.7"


def test_proxy_waits_for_the_nodes_to_start_but_not_to_be_healthy() -> None:
    depends_on = service("proxy")["depends_on"]
    assert {name: dependency["condition"] for name, dependency in depends_on.items()} == {
        node: "service_started" for node in NODES
    }


def test_dockerfile_runs_videoconsult_serve_as_non_root_with_a_healthz_check() -> None:
    froms = [arguments for name, arguments in dockerfile_instructions() if name == "FROM"]
    assert froms[0].split()[0] == "python:3.11-slim"
    cmd: list[str] = json.loads(dockerfile_args("CMD")[0])
    assert cmd[:2] == ["videoconsult", "serve"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    (user,) = dockerfile_args("USER")
    assert user.split(":")[0] not in ("root", "0")
    (healthcheck,) = dockerfile_args("HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert "urllib" in healthcheck
    assert f":{cmd[cmd.index('--port') + 1]}/healthz" in healthcheck
    assert "[test]" not in " ".join(dockerfile_args("RUN")), "no test extras in the image"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".venv", "data", ".git"} <= patterns
    assert not {"pyproject.toml", "README.md", "LICENSE", "server", "config"} & patterns


def test_coturn_uses_shared_secret_auth_from_the_mounted_config() -> None:
    assert service("coturn")["image"].startswith("coturn/coturn")
    options = coturn_config()
    assert "use-auth-secret" in options
    assert "static-auth-secret" not in options, "the secret comes from .env, not the file"
    assert options["listening-port"] == ["3478"]
    for flag in ("fingerprint", "no-cli", "no-tlsv1"):
        assert flag in options
    command = " ".join(service("coturn")["command"])
    assert "--static-auth-secret=${TURN_SECRET:?" in command


def test_coturn_relays_to_no_private_or_loopback_peers() -> None:
    denied = []
    for entry in coturn_config()["denied-peer-ip"]:
        first, _, last = entry.partition("-")
        denied.append((ipaddress.ip_address(first), ipaddress.ip_address(last or first)))
    addresses = ("10.1.2.3", "172.18.0.2", "192.168.1.1", "127.0.0.1", "169.254.169.254")
    for address in (*addresses, "::1", "fd00::1", "fe80::1"):
        ip = ipaddress.ip_address(address)
        assert any(
            low.version == ip.version and int(low) <= int(ip) <= int(high) for low, high in denied
        ), f"coturn may relay to {address}"


def test_coturn_relay_ports_are_a_small_published_range() -> None:
    options = coturn_config()
    low, high = int(options["min-port"][0]), int(options["max-port"][0])
    assert 0 < high - low <= 1000
    coturn = service("coturn")
    if coturn.get("network_mode") != "host":
        published = " ".join(str(entry) for entry in coturn.get("ports", []))
        assert f"{low}-{high}" in published
        assert "3478" in published


@pytest.mark.parametrize("node", NODES)
def test_node_hands_out_turn_over_udp_tcp_and_tls_on_443(node: str) -> None:
    environ = {k: interpolate(v, PLACEHOLDERS) for k, v in environment(node).items()}
    urls = [url.strip() for url in environ["VIDEOCONSULT_TURN_TURN_URLS"].split(",")]
    assert "turn:turn.clinic.example:3478?transport=udp" in urls
    assert "turn:turn.clinic.example:3478?transport=tcp" in urls
    assert "turns:turn.clinic.example:443?transport=tcp" in urls
    assert environ["VIDEOCONSULT_TURN_SECRET"] == PLACEHOLDERS["TURN_SECRET"]
    conf = (ROOT / "deploy" / "coturn" / "turnserver.conf").read_text()
    assert "tls-listening-port=443" in conf
    assert "use-auth-secret" in conf


def test_the_image_installs_exactly_the_runtime_lock() -> None:
    """Every pip run in the image takes its packages from requirements/runtime.txt
    (hash-checked) or installs our own wheel without dependencies, so no build
    fetches whatever was newest that day."""
    pip_runs = [
        command.strip()
        for arguments in dockerfile_args("RUN", all_stages=True)
        for command in arguments.split("&&")
        if re.match(r"\s*pip (install|wheel)\b", command)
    ]
    assert pip_runs
    locked = [c for c in pip_runs if "--require-hashes" in c]
    assert len(locked) == 2, "the build stage and the image each install the lock"
    for command in pip_runs:
        words = shlex.split(command)
        assert "--no-deps" in words, f"pip resolves on its own: {command!r}"
        if "--require-hashes" in words:
            assert words[words.index("-r") + 1].endswith("runtime.txt"), command
        elif words[1] == "wheel":
            assert "--no-build-isolation" in words, f"the build fetches setuptools: {command!r}"
        else:
            assert words[-1].endswith(".whl"), f"not the locked set or our wheel: {command!r}"
    copies = " ".join(dockerfile_args("COPY", all_stages=True))
    assert "requirements/runtime.txt" in copies
