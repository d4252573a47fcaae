"""ICE servers for a participant, with short-lived TURN credentials.

The TURN REST API form that coturn checks with ``use-auth-secret``: the
username is ``<expiry unix time>:<pseudonymous id>`` and the password is the
base64 HMAC-SHA1 of the username under the shared secret. Nothing to store:
coturn recomputes the password and refuses it once the time has passed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from typing import Any


def turn_credentials(secret: str, pseudonym: str, *, now: datetime, ttl_s: int) -> tuple[str, str]:
    """Return (username, password) valid for ``ttl_s`` seconds from ``now``."""
    expiry = int(now.timestamp()) + ttl_s
    username = f"{expiry}:{pseudonym}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers(
    *,
    stun_urls: list[str],
    turn_urls: list[str],
    secret: str,
    pseudonym: str,
    now: datetime,
    ttl_s: int,
) -> list[dict[str, Any]]:
    """The ``iceServers`` list for RTCPeerConnection (empty on one LAN without TURN)."""
    servers: list[dict[str, Any]] = []
    if stun_urls:
        servers.append({"urls": stun_urls})
    if turn_urls and secret:
        username, password = turn_credentials(secret, pseudonym, now=now, ttl_s=ttl_s)
        servers.append({"urls": turn_urls, "username": username, "credential": password})
    return servers
