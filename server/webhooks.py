"""Sending the webhooks' outbox: signed messages to the practices' endpoints.

A periodic job (:func:`deliver_due`, ``webhooks`` in server/jobs.py) claims
the due deliveries (:func:`audit.outbox.claim_due`), sends each with the
application's HTTP client, and records how it went; the database work is in
short transactions of its own, and none is open while a message is on its
way. Each message is signed per the Standard Webhooks specification with the
``standardwebhooks`` package: ``webhook-id`` (the event's, the same on
every attempt), ``webhook-timestamp`` (the attempt's, in seconds) and
``webhook-signature`` (``v1,<base64 HMAC-SHA256>``, one per secret in force:
two for a day after a rotation). Redirects are not followed, and the answer's
body is not read: a 2xx status is all that counts.

The therapist appears in a message as the external id an admin set for the
account, or else as the pseudonym support staff see
(:class:`audit.support.TherapistPseudonyms`), made as it is sent
(``therapist_id_kind`` says which). So is the
practice's appointment reference of a consult event's consult
(:mod:`audit.references`), unsealed as the message is made, never stored
with the event; once the last consult event of an ended consult is
delivered (or failed for good) it is destroyed, in the transaction that
records that.
"""

from __future__ import annotations

import asyncio
import enum
import json
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aiohttp import (
    ClientError,
    ClientSession,
    ClientTimeout,
    DummyCookieJar,
    TCPConnector,
    web,
)
from aiohttp import client_exceptions as http_errors
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from standardwebhooks import Webhook

from audit.accounts import external_ids
from audit.clock import SystemClock
from audit.errors import InvalidValue
from audit.fhir import encounter_of
from audit.outbox import (
    DeliveryStatus,
    DueDelivery,
    claim_due,
    purge_history,
    record_attempt,
    record_disclosure,
)
from audit.references import destroy_spent_references, read_references
from audit.support import TherapistPseudonyms
from audit.webhooks import (
    Endpoint,
    EventType,
    Payload,
    check_destination,
    endpoints_by_id,
    may_receive,
)
from server.app_keys import CLOCK, DB_ENGINE, MASTER_KEY, METRICS, SETTINGS, WEBHOOK_HTTP

_log = structlog.get_logger("videoconsult.webhooks")

# Sends on their way at once from one node, and to one endpoint: an endpoint
# that hangs, however long its backlog, takes PER_ENDPOINT of them and leaves
# the rest to the other endpoints. One round tries MAX_PER_ROUND at most (the
# rest wait for the next round, a poll interval later).
IN_FLIGHT = 20
PER_ENDPOINT = 4
MAX_PER_ROUND = 200
HISTORY_PURGE_INTERVAL_S = 3600.0
USER_AGENT = "videoconsult-webhooks/1"


class ReceiverResolver(AbstractResolver):
    """The system's resolver, keeping only addresses a webhook may go to
    (:func:`audit.webhooks.may_receive`): an endpoint's host name is checked
    at each connection, so a name that comes to resolve to this machine or
    a private network (DNS rebinding) is not followed there."""

    def __init__(self, *, allow_private_networks: bool) -> None:
        self._inner = DefaultResolver()
        self._allow_private = allow_private_networks

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        allowed = [
            entry
            for entry in found
            if may_receive(entry["host"], allow_private_networks=self._allow_private)
        ]
        if not allowed:
            raise NotAReceiver(f"{host} resolves to no address a webhook may go to")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class NotAReceiver(OSError):
    """A host name resolved only to addresses a webhook may not go to."""


async def webhook_client_context(app: web.Application) -> AsyncIterator[None]:
    """The HTTP client the deliveries go out with (no cookies kept between them)."""
    resolver = ReceiverResolver(
        allow_private_networks=app[SETTINGS].webhooks.allow_private_networks
    )
    connector = TCPConnector(resolver=resolver)
    async with ClientSession(connector=connector, cookie_jar=DummyCookieJar()) as session:
        app[WEBHOOK_HTTP] = session
        yield


# The name of each send's task (the job's own is named after the job).
DELIVERY_TASK = "webhook-delivery"


async def deliver_due(app: web.Application) -> int:
    """Send the deliveries that are due now, and those that fall due while
    sends are on their way; return how many were tried.

    The round claims again whenever a send finishes and every
    ``webhooks.poll_interval_s`` while sends are on their way (at most
    :data:`IN_FLIGHT` at once, :data:`PER_ENDPOINT` to one endpoint), so a
    send waiting out its timeout holds back no other endpoint's; it ends
    when nothing is on its way and nothing more is due, or after
    :data:`MAX_PER_ROUND`. A send's own failure is its delivery's; the first
    error claiming or recording one (the database) ends the claiming and is
    raised once the sends on their way finished.
    """
    settings = app[SETTINGS].webhooks
    sending: dict[asyncio.Task[None], uuid.UUID] = {}
    tried = 0
    failure: BaseException | None = None
    try:
        while True:
            room = min(IN_FLIGHT - len(sending), MAX_PER_ROUND - tried)
            if failure is None and room > 0:
                try:
                    claimed = await _claim(app, room, Counter(sending.values()))
                except Exception as err:
                    # The database away for a moment: the sends on their way
                    # finish and are recorded (or they would be sent again).
                    failure, claimed = err, []
                for due, endpoint, filled_in in claimed:
                    task = asyncio.create_task(
                        _deliver(app, due, endpoint, filled_in), name=DELIVERY_TASK
                    )
                    sending[task] = due.endpoint_id
                    tried += 1
            if not sending:
                break
            done, _ = await asyncio.wait(
                sending, timeout=settings.poll_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                del sending[task]
                if failure is None and (error := task.exception()) is not None:
                    failure = error
    finally:
        # Cancelled (the node stops): the sends on their way go with it; a
        # delivery cut off is sent again once its claim runs out.
        for task in sending:
            task.cancel()
        if sending:
            await asyncio.wait(sending)
    if failure is not None:
        raise failure
    return tried


async def _claim(
    app: web.Application, room: int, in_flight: Mapping[uuid.UUID, int]
) -> list[tuple[DueDelivery, Endpoint, dict[str, Any]]]:
    """Claim up to ``room`` due deliveries, each with its endpoint and what
    its message fills in."""
    settings = app[SETTINGS].webhooks
    async with app[DB_ENGINE].begin() as conn:
        claimed = await claim_due(
            conn,
            now=app[CLOCK].now(),
            lease_s=settings.timeout_s + settings.claim_margin_s,
            limit=room,
            per_endpoint=PER_ENDPOINT,
            in_flight=in_flight,
        )
        if not claimed:
            return []
        endpoints = await endpoints_by_id(conn, {due.endpoint_id for due in claimed})
        references = await read_references(
            conn,
            app[MASTER_KEY].key,
            (due.subject_id for due in claimed if due.event_type in CONSULT_EVENTS),
        )
        named = await external_ids(conn, (d.therapist_id for d in claimed if d.therapist_id))
    pseudonyms = TherapistPseudonyms(app[MASTER_KEY].key)
    return [
        (
            due,
            endpoints[due.endpoint_id],
            filled_in_data(
                due,
                therapist_of(due.therapist_id, named, pseudonyms),
                references.get(due.subject_id),
            ),
        )
        for due in claimed
    ]


# The consult's events: a FHIR endpoint is sent them as an Encounter (the
# others go as Standard Webhooks' JSON), and they carry the appointment reference.
CONSULT_EVENTS = frozenset({EventType.CONSULT_STARTED, EventType.CONSULT_ENDED})


def message_body(
    due: DueDelivery, filled_in: Mapping[str, Any], payload: Payload
) -> tuple[bytes, str]:
    """What is sent for ``due`` with what the sender fills in (the therapist,
    the appointment reference), and its content type: Standard Webhooks' JSON,
    or for an endpoint that takes FHIR a consult event as an Encounter (signed
    the same way: the signature covers whatever body is sent)."""
    if payload is Payload.FHIR and due.event_type in CONSULT_EVENTS:
        encounter = encounter_of({**due.data, **filled_in})
        return json.dumps(encounter, separators=(",", ":")).encode(), "application/fhir+json"
    return json.dumps(due.message(filled_in), separators=(",", ":")).encode(), "application/json"


class TherapistIdKind(enum.StrEnum):
    """How a message names its therapist (``therapist_id_kind``)."""

    # The pseudonym support staff see (no external id set).
    PSEUDONYM = "pseudonym"
    # The external id an admin set for the account.
    EXTERNAL = "external"


def therapist_of(
    account_id: uuid.UUID | None,
    named: Mapping[uuid.UUID, str],
    pseudonyms: TherapistPseudonyms,
) -> tuple[str, TherapistIdKind] | None:
    """The therapist as a message names them; None after an erasure."""
    if account_id is None:
        return None
    if account_id in named:
        return named[account_id], TherapistIdKind.EXTERNAL
    return pseudonyms.of(account_id), TherapistIdKind.PSEUDONYM


def filled_in_data(
    due: DueDelivery,
    therapist: tuple[str, TherapistIdKind] | None,
    appointment_reference: str | None,
) -> dict[str, Any]:
    """What the sender adds to the stored data: the therapist and how they are
    named (both None after an erasure) and, in a consult event whose consult
    has one, its appointment reference."""
    name, kind = therapist if therapist is not None else (None, None)
    filled_in: dict[str, Any] = {"therapist": name, "therapist_id_kind": kind}
    if due.event_type in CONSULT_EVENTS and appointment_reference is not None:
        filled_in["appointment_reference"] = appointment_reference
    return filled_in


def signed_headers(
    due: DueDelivery, secrets: list[str], body: bytes, *, at: float
) -> dict[str, str]:
    """The Standard Webhooks headers of ``body`` sent at ``at`` (POSIX seconds)."""
    moment = datetime.fromtimestamp(int(at), tz=UTC)
    signatures = " ".join(
        Webhook(secret).sign(msg_id=due.webhook_id, timestamp=moment, data=body)
        for secret in secrets
    )
    return {
        "webhook-id": due.webhook_id,
        "webhook-timestamp": str(int(at)),
        "webhook-signature": signatures,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }


async def _deliver(
    app: web.Application, due: DueDelivery, endpoint: Endpoint, filled_in: Mapping[str, Any]
) -> None:
    settings = app[SETTINGS].webhooks
    now = app[CLOCK].now()
    master_key = app[MASTER_KEY].key
    status_code: int | None = None
    error: str | None = None
    try:
        # The settings may have changed since the endpoint was registered (a
        # port taken out of webhooks.allowed_ports, private networks turned
        # off): an address in the URL meets no resolver that would check it.
        check_destination(
            endpoint.url,
            allow_http_loopback=settings.allow_http_loopback,
            allow_private_networks=settings.allow_private_networks,
            allowed_ports=settings.allowed_ports,
        )
        body, content_type = message_body(due, filled_in, endpoint.payload)
        # The signature's timestamp is the wall clock's: the receiver compares
        # it with its own to refuse replays (5 minutes apart at most), whatever
        # clock schedules the attempts.
        sent_at = SystemClock().now().timestamp()
        headers = signed_headers(due, endpoint.secrets(master_key, now=now), body, at=sent_at)
        headers["Content-Type"] = content_type
        async with app[WEBHOOK_HTTP].post(
            endpoint.url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=ClientTimeout(total=settings.timeout_s),
        ) as response:
            status_code = response.status
    except InvalidValue as err:
        error = f"not sent: {err}"
    except TimeoutError:
        error = f"no answer within {settings.timeout_s:g} s"
    except ClientError as err:
        error = describe_failure(err)
    except Exception as err:  # any failure of one send is that delivery's
        # Found in review: an endpoint's host name aiohttp could not encode
        # (UnicodeError) escaped, left the delivery pending for good and ended
        # the round for every organisation. It is an attempt that failed.
        error = f"the message could not be sent ({type(err).__name__})"
        _log.warning(
            "webhook send broke", endpoint_id=str(endpoint.id), error_type=type(err).__name__
        )
    if status_code is not None and not 200 <= status_code < 300:
        error = f"answered HTTP {status_code}"
    taken = error is None and status_code is not None
    finished_at = app[CLOCK].now()
    async with app[DB_ENGINE].begin() as conn:
        status = await record_attempt(
            conn,
            due,
            status_code=status_code,
            error=error,
            now=finished_at,
            retry_base_s=settings.retry_base_s,
            retry_for_s=settings.retry_for_s,
        )
        if taken:
            # After the delivery's row, as the retention purge takes them (the
            # rows, then the chain's lock): the two never wait for each other
            # in a circle. Written even when another node had finished the
            # delivery meanwhile: this answer too says the message was taken.
            await record_disclosure(
                conn,
                due,
                endpoint_id=endpoint.id,
                organisation_id=endpoint.organisation_id,
                now=finished_at,
            )
        if status in (DeliveryStatus.DELIVERED, DeliveryStatus.FAILED) and (
            due.event_type in CONSULT_EVENTS
        ):
            await destroy_spent_references(conn, [due.subject_id])
    # No URL in the process log: an endpoint's query string may hold a token.
    details = {
        "endpoint_id": str(endpoint.id),
        "event_type": due.event_type.value,
        "webhook_id": due.webhook_id,
        "attempt": due.attempt,
    }
    if status is None:
        # Another node took the delivery over (this node's claim ran out):
        # its result counts, not this late one.
        _log.info("webhook attempt superseded by another node's", **details)
        return
    app[METRICS].record_webhook_attempt(status)
    if status is DeliveryStatus.DELIVERED:
        _log.info("webhook delivered", **details)
    elif status is DeliveryStatus.FAILED:
        _log.warning("webhook failed for good; no more attempts", error=error, **details)
    else:
        _log.info("webhook not delivered; trying again later", error=error, **details)


def describe_failure(err: ClientError) -> str:
    """What went wrong before an answer came, in a few words for the admin."""
    if isinstance(err, http_errors.ClientConnectorCertificateError | http_errors.ClientSSLError):
        return "TLS failed (the endpoint's certificate was not accepted)"
    if isinstance(err, http_errors.ClientConnectorDNSError):
        if isinstance(err.os_error, NotAReceiver):
            return "the host name resolves to no address a webhook may go to"
        return "the host name was not found"
    if isinstance(err, http_errors.ClientConnectorError):
        return "could not connect"
    if isinstance(err, http_errors.ServerDisconnectedError):
        return "the connection closed before an answer"
    if isinstance(err, http_errors.InvalidURL):
        return "the URL is not usable"
    return f"HTTP client error ({type(err).__name__})"[:200]


async def purge_webhook_history(app: web.Application) -> None:
    """Delete deliveries finished longer than ``webhooks.history_days`` ago."""
    days = app[SETTINGS].webhooks.history_days
    async with app[DB_ENGINE].begin() as conn:
        await purge_history(conn, before=app[CLOCK].now() - timedelta(days=days))
