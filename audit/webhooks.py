"""An organisation's webhook endpoints and their signing secrets, at rest.

An endpoint is where a practice's record system hears of its consults and
recordings: a URL, the events it takes (:class:`EventType`) and a secret in
the Standard Webhooks format (``whsec_`` and the base64 of 32 random bytes),
shown once when it is made or rotated and kept sealed (``seal`` with purpose
``webhook-secret``, bound to the endpoint's id). After a rotation the previous
secret signs too, for :data:`ROTATION_OVERLAP_S`, so that the receiver can
switch without losing a message. What is sent, and when, is in
:mod:`audit.outbox`.

The URL's rules (https on port 443 or one the operator lists, or http to
127.0.0.1 when the server allows it) are checked by :func:`check_url`, which
raises :class:`InvalidValue` naming the problem; the ones that depend on the
server's settings again before each send (:func:`check_destination`).
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import secrets
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import SplitResult, urlsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.errors import Conflict, InvalidValue, NotFound
from audit.schema import webhook_endpoints
from audit.sealing import seal, unseal

SECRET_PURPOSE = "webhook-secret"  # noqa: S105 - a key-derivation label, not a secret
SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
SECRET_BYTES = 32
# After a rotation the previous secret signs too, this long: a day to put the
# new one into the record system.
ROTATION_OVERLAP_S = 86400
# An organisation needs a few (a record system, a billing system, a test
# receiver); a limit keeps one admin from making the server send thousands.
MAX_ENDPOINTS_PER_ORGANISATION = 10
MAX_URL_CHARS = 2000


class EventType(enum.StrEnum):
    """What an endpoint can be told of; the message's ``type``."""

    # The therapist admitted the patient: the consult has started.
    CONSULT_STARTED = "consult.started"
    # The consult ended (or was closed without starting: status not_started).
    CONSULT_ENDED = "consult.ended"
    # A recording was finished (complete, or incomplete: the writer stopped
    # early) and can be downloaded by its therapist.
    RECORDING_AVAILABLE = "recording.available"
    # A recording was destroyed (by its therapist, the operator or retention).
    RECORDING_DELETED = "recording.deleted"


def parse_event_types(names: Iterable[str]) -> tuple[EventType, ...]:
    """The event types named, in the order of :class:`EventType`; InvalidValue
    names an unknown one, a repeated one, or none at all."""
    chosen: list[EventType] = []
    for name in names:
        try:
            kind = EventType(name)
        except ValueError:
            known = ", ".join(kind.value for kind in EventType)
            raise InvalidValue(f"unknown event {name!r}; known: {known}") from None
        if kind in chosen:
            raise InvalidValue(f"event {name!r} is named twice")
        chosen.append(kind)
    if not chosen:
        raise InvalidValue("name at least one event")
    return tuple(kind for kind in EventType if kind in chosen)


# The well-known NAT64 prefix (RFC 6052): its last 32 bits are an IPv4 address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def may_receive(address: str, *, allow_private_networks: bool) -> bool:
    """Whether a webhook may go to ``address`` (an IP address): a public one;
    with ``allow_private_networks`` also one of a private network (10/8,
    192.168/16, fc00::/7, ...). Never this machine, a link-local address (a
    cloud's metadata service) or an unspecified, multicast or reserved one."""
    try:
        found = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(found, ipaddress.IPv6Address):
        # An IPv4 address inside an IPv6 one (found in review: NAT64 and 6to4
        # addresses count as global, and lead to the IPv4 address they hold).
        inner = found.ipv4_mapped or found.sixtofour
        if inner is None and found in _NAT64:
            inner = ipaddress.IPv4Address(int(found) & 0xFFFFFFFF)
        if inner is None and found.teredo is not None:
            inner = found.teredo[1]
        if inner is not None:
            found = inner
    if found.is_global:
        return True
    never = (
        found.is_loopback
        or found.is_link_local
        or found.is_unspecified
        or found.is_multicast
        or found.is_reserved
    )
    return allow_private_networks and found.is_private and not never


# The port of https, the one an endpoint may name without the operator's say.
HTTPS_PORT = 443


def check_url(
    url: str,
    *,
    allow_http_loopback: bool,
    allow_private_networks: bool = False,
    allowed_ports: Collection[int] = (),
) -> str:
    """Return ``url`` if an endpoint may have it; InvalidValue says why not.

    https to a host name or a public address (:func:`may_receive`), on port
    443 or one of ``allowed_ports`` (``webhooks.allowed_ports``); http only
    to 127.0.0.1 (any port: a test's receiver, or a relay on this machine),
    and only where the server allows it. No user name or password in it
    (they would be stored in the clear), no fragment. A host name is checked
    again when it is resolved for each send, the rest by
    :func:`check_destination`.
    """
    if len(url) > MAX_URL_CHARS:
        raise InvalidValue(f"the URL is longer than {MAX_URL_CHARS} characters")
    parts = _split(url)
    host = parts.hostname
    if parts.scheme not in ("https", "http") or not host:
        raise InvalidValue("the URL must start with https:// and name a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidValue("the URL must not hold a user name or password")
    if parts.fragment or url.endswith("#"):
        raise InvalidValue("the URL must not have a fragment (#...)")
    if any(char.isspace() for char in url):
        raise InvalidValue("the URL must not contain spaces")
    if _address(host) is None:
        try:
            host.encode("idna")  # what the resolver and the TLS check will need
        except UnicodeError:
            raise InvalidValue(
                "the URL's host name is not one (an empty part, or a part over 63 characters)"
            ) from None
    if parts.scheme == "https" and host == "localhost":
        raise InvalidValue(_not_there(allow_private_networks))
    check_destination(
        url,
        allow_http_loopback=allow_http_loopback,
        allow_private_networks=allow_private_networks,
        allowed_ports=allowed_ports,
    )
    return url


def check_destination(
    url: str,
    *,
    allow_http_loopback: bool,
    allow_private_networks: bool,
    allowed_ports: Collection[int],
) -> None:
    """InvalidValue if the server's settings, as they are now, do not let a
    message go where ``url`` points: its scheme, its port, an address in it.
    Checked at registration and again before each send (the settings may
    have changed since; a host name is checked as it resolves)."""
    parts = _split(url)
    host = parts.hostname or ""
    address = _address(host)
    if parts.scheme == "http":
        if not allow_http_loopback:
            raise InvalidValue("the URL must use https")
        if address is None or str(address) != "127.0.0.1":
            raise InvalidValue("http is allowed to 127.0.0.1 only; use https")
        return
    if parts.scheme != "https":
        raise InvalidValue("the URL must start with https:// and name a host")
    port = parts.port
    if port is not None and port != HTTPS_PORT and port not in allowed_ports:
        listed = ", ".join(str(each) for each in sorted(allowed_ports)) or "none"
        raise InvalidValue(
            f"port {port} is not allowed: an endpoint uses https's port {HTTPS_PORT} or one "
            f"the server lists in webhooks.allowed_ports (now: {listed})"
        )
    if address is not None and not may_receive(
        str(address), allow_private_networks=allow_private_networks
    ):
        raise InvalidValue(_not_there(allow_private_networks))


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        raise InvalidValue("the URL cannot be read (a port or address that is not one)") from None
    return parts


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _not_there(allow_private_networks: bool) -> str:
    private = "" if allow_private_networks else ", a private network"
    return (
        f"the URL must not point at this machine{private} or a link-local, "
        "unspecified or reserved address"
    )


def new_secret() -> str:
    """A new signing secret in the Standard Webhooks format."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


class Payload(enum.StrEnum):
    """What an endpoint is sent for consult events (recording events are always STANDARD)."""

    # Standard Webhooks' body: {"type", "timestamp", "data"}.
    STANDARD = "standard"
    # consult.started and consult.ended as a FHIR R4 Encounter (audit/fhir.py).
    FHIR = "fhir"


@dataclass(frozen=True)
class Endpoint:
    id: uuid.UUID
    organisation_id: uuid.UUID
    url: str
    events: tuple[EventType, ...]
    created_at: datetime
    secret_rotated_at: datetime | None
    # Until when the secret before the last rotation signs too.
    previous_expires_at: datetime | None
    secret_sealed: bytes = field(repr=False)
    previous_secret_sealed: bytes | None = field(repr=False)
    payload: Payload = Payload.STANDARD

    def secrets(self, master_key: bytes, *, now: datetime) -> list[str]:
        """The secrets that sign a message sent now: the current one first."""
        bound_to = str(self.id)
        found = [unseal(master_key, SECRET_PURPOSE, self.secret_sealed, bound_to=bound_to)]
        if (
            self.previous_secret_sealed is not None
            and self.previous_expires_at is not None
            and now < self.previous_expires_at
        ):
            found.append(
                unseal(master_key, SECRET_PURPOSE, self.previous_secret_sealed, bound_to=bound_to)
            )
        return [secret.decode() for secret in found]


def _endpoint(row: sa.Row[tuple[object, ...]]) -> Endpoint:
    m = row._mapping
    return Endpoint(
        id=m["id"],
        organisation_id=m["organisation_id"],
        url=m["url"],
        events=tuple(EventType(name) for name in m["events"]),
        created_at=m["created_at"],
        secret_rotated_at=m["secret_rotated_at"],
        previous_expires_at=m["previous_expires_at"],
        secret_sealed=m["secret_sealed"],
        previous_secret_sealed=m["previous_secret_sealed"],
        payload=Payload(m["payload"]),
    )


async def add_endpoint(
    conn: AsyncConnection,
    master_key: bytes,
    organisation_id: uuid.UUID,
    *,
    url: str,
    events: tuple[EventType, ...],
    now: datetime,
    payload: Payload = Payload.STANDARD,
) -> tuple[Endpoint, str]:
    """Register an endpoint; return it and its secret (shown once, kept sealed).

    Conflict when the organisation has :data:`MAX_ENDPOINTS_PER_ORGANISATION`.
    """
    count = await conn.scalar(
        sa.select(sa.func.count()).where(webhook_endpoints.c.organisation_id == organisation_id)
    )
    if (count or 0) >= MAX_ENDPOINTS_PER_ORGANISATION:
        raise Conflict(
            f"an organisation has at most {MAX_ENDPOINTS_PER_ORGANISATION} webhook endpoints; "
            "delete one first"
        )
    endpoint_id = uuid.uuid4()
    secret = new_secret()
    await conn.execute(
        webhook_endpoints.insert().values(
            id=endpoint_id,
            organisation_id=organisation_id,
            url=url,
            events=[kind.value for kind in events],
            payload=payload.value,
            secret_sealed=seal(
                master_key, SECRET_PURPOSE, secret.encode(), bound_to=str(endpoint_id)
            ),
            created_at=now,
        )
    )
    return await get_endpoint(conn, endpoint_id, organisation_id=organisation_id), secret


async def get_endpoint(
    conn: AsyncConnection, endpoint_id: uuid.UUID, *, organisation_id: uuid.UUID
) -> Endpoint:
    """The organisation's endpoint (NotFound for another organisation's)."""
    row = (
        await conn.execute(
            sa.select(webhook_endpoints).where(
                webhook_endpoints.c.id == endpoint_id,
                webhook_endpoints.c.organisation_id == organisation_id,
            )
        )
    ).first()
    if row is None:
        raise NotFound("no such webhook endpoint")
    return _endpoint(row)


async def list_endpoints(conn: AsyncConnection, organisation_id: uuid.UUID) -> list[Endpoint]:
    """The organisation's endpoints, oldest first."""
    rows = await conn.execute(
        sa.select(webhook_endpoints)
        .where(webhook_endpoints.c.organisation_id == organisation_id)
        .order_by(webhook_endpoints.c.created_at, webhook_endpoints.c.id)
    )
    return [_endpoint(row) for row in rows]


async def endpoints_by_id(
    conn: AsyncConnection, endpoint_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, Endpoint]:
    ids = list(endpoint_ids)
    if not ids:
        return {}
    rows = await conn.execute(sa.select(webhook_endpoints).where(webhook_endpoints.c.id.in_(ids)))
    return {row.id: _endpoint(row) for row in rows}


async def delete_endpoint(
    conn: AsyncConnection, endpoint_id: uuid.UUID, *, organisation_id: uuid.UUID
) -> None:
    """Delete the endpoint with its deliveries (pending ones are not sent)."""
    await get_endpoint(conn, endpoint_id, organisation_id=organisation_id)
    await conn.execute(webhook_endpoints.delete().where(webhook_endpoints.c.id == endpoint_id))


async def rotate_secret(
    conn: AsyncConnection,
    master_key: bytes,
    endpoint_id: uuid.UUID,
    *,
    organisation_id: uuid.UUID,
    now: datetime,
) -> tuple[Endpoint, str]:
    """Give the endpoint a new secret (returned, shown once); the current one
    keeps signing too for :data:`ROTATION_OVERLAP_S`, an older one no more."""
    endpoint = await get_endpoint(conn, endpoint_id, organisation_id=organisation_id)
    secret = new_secret()
    await conn.execute(
        webhook_endpoints.update()
        .where(webhook_endpoints.c.id == endpoint.id)
        .values(
            secret_sealed=seal(
                master_key, SECRET_PURPOSE, secret.encode(), bound_to=str(endpoint.id)
            ),
            previous_secret_sealed=endpoint.secret_sealed,
            previous_expires_at=now + timedelta(seconds=ROTATION_OVERLAP_S),
            secret_rotated_at=now,
        )
    )
    return await get_endpoint(conn, endpoint.id, organisation_id=organisation_id), secret
