"""Reading the nginx config in deploy/ (tests/test_compose.py checks it,
tests/test_proxy.py runs it)."""

from __future__ import annotations

import re
import shlex

from tests.support import ROOT

NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


def nginx_config() -> str:
    """nginx.conf without its comments."""
    text = NGINX_CONF.read_text(encoding="utf-8")
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def nginx_directives(name: str, text: str | None = None) -> list[list[str]]:
    """The arguments of every ``name`` directive (blocks not told apart)."""
    pattern = re.compile(rf"(?<![\w$.-]){re.escape(name)}\s+([^;{{}}]*);")
    return [shlex.split(match.group(1)) for match in pattern.finditer(text or nginx_config())]


def nginx_upstream_servers() -> list[str]:
    """host:port of every server in nginx's upstream block."""
    (block,) = re.findall(r"upstream\s+\w+\s*\{([^}]*)\}", nginx_config())
    return [arguments[0] for arguments in nginx_directives("server", block)]
