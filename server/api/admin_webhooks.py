"""The organisation's webhook endpoints, for its admins: register one (its
secret shown once), list them, see each one's recent deliveries and
failures, rotate a secret, delete one. Every call is in the access log."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from aiohttp import web
from pydantic import Field
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.access_log import Outcome
from audit.accounts import Role
from audit.db import reading
from audit.delivery_history import DeliveryEntry, delivery_counts, recent_deliveries
from audit.errors import NotFound
from audit.outbox import DeliveryStatus
from audit.webhooks import (
    MAX_URL_CHARS,
    Endpoint,
    EventType,
    Payload,
    add_endpoint,
    check_url,
    delete_endpoint,
    get_endpoint,
    list_endpoints,
    parse_event_types,
    rotate_secret,
)
from server.api.access_records import record_in, record_read
from server.api.body import RequestBody, read_json
from server.api.errors import NotFoundError, Unprocessable
from server.api.query import NO_PARAMS, query_params
from server.api.representations import iso
from server.app_keys import CLOCK, DB_ENGINE, MASTER_KEY, SETTINGS
from server.auth.sessions import Principal, require_role

routes = web.RouteTableDef()

ENDPOINTS_PATH = "/api/admin/webhooks"
ENDPOINT_PATH = ENDPOINTS_PATH + "/{endpoint_id}"
OBJECT_TYPE = "webhook_endpoint"


class NewEndpointBody(RequestBody):
    url: str = Field(min_length=1, max_length=MAX_URL_CHARS)
    events: list[str] = Field(min_length=1, max_length=len(EventType))
    # consult.started and consult.ended as a FHIR R4 Encounter ("fhir"), or not.
    payload: Literal["standard", "fhir"] = "standard"


def endpoint_json(endpoint: Endpoint, counts: dict[str, int] | None = None) -> dict[str, Any]:
    """An endpoint as the API shows it: never its secret."""
    return {
        "id": str(endpoint.id),
        "url": endpoint.url,
        "events": [kind.value for kind in endpoint.events],
        "payload": endpoint.payload.value,
        "created_at": iso(endpoint.created_at),
        "secret_rotated_at": iso(endpoint.secret_rotated_at),
        "previous_secret_expires_at": iso(endpoint.previous_expires_at),
        "deliveries": counts or {kind.value: 0 for kind in DeliveryStatus},
    }


def delivery_json(entry: DeliveryEntry) -> dict[str, Any]:
    return {
        "webhook_id": entry.webhook_id,
        "event": entry.event_type.value,
        "subject_id": str(entry.subject_id),
        "event_at": iso(entry.event_at),
        "status": entry.status.value,
        "attempts": entry.attempts,
        "next_attempt_at": iso(entry.next_attempt_at),
        "last_attempt_at": iso(entry.last_attempt_at),
        "last_status_code": entry.last_status_code,
        "last_error": entry.last_error,
        "finished_at": iso(entry.finished_at),
    }


async def _record(
    conn: AsyncConnection,
    request: web.Request,
    principal: Principal,
    action: str,
    endpoint_id: uuid.UUID | None,
) -> None:
    """A change's record, in the change's transaction."""
    await record_in(
        conn,
        request,
        principal,
        action=action,
        object_type=OBJECT_TYPE if endpoint_id is not None else "organisation",
        object_id=endpoint_id if endpoint_id is not None else principal.account.organisation_id,
    )


async def _record_read(
    request: web.Request,
    principal: Principal,
    action: str,
    endpoint_id: uuid.UUID | None,
    outcome: Outcome = Outcome.ALLOWED,
) -> None:
    """A read's record (or a refusal's: nothing changed), through the
    access-log writer: committed before the answer."""
    await record_read(
        request,
        principal,
        action=action,
        object_type=OBJECT_TYPE if endpoint_id is not None else "organisation",
        object_id=endpoint_id if endpoint_id is not None else principal.account.organisation_id,
        outcome=outcome,
    )


async def _own_endpoint(request: web.Request, principal: Principal, action: str) -> uuid.UUID:
    """The endpoint named in the path, if it is the admin's organisation's (else 404,
    recorded as a refused access through the access-log writer)."""
    try:
        endpoint_id = uuid.UUID(request.match_info["endpoint_id"])
    except ValueError:
        raise NotFoundError("no such webhook endpoint") from None
    organisation_id = principal.account.organisation_id
    try:
        async with reading(request.app[DB_ENGINE]) as conn:
            await get_endpoint(conn, endpoint_id, organisation_id=organisation_id)
    except NotFound:
        await _record_read(request, principal, action, endpoint_id, Outcome.REFUSED)
        raise
    return endpoint_id


@routes.get(ENDPOINTS_PATH)
async def endpoints_list(request: web.Request) -> web.Response:
    """The organisation's endpoints, with how many deliveries are in each status."""
    principal = await require_role(request, Role.ADMIN, action="webhook.list")
    query_params(request, NO_PARAMS)
    organisation_id = principal.account.organisation_id
    async with reading(request.app[DB_ENGINE]) as conn:
        found = await list_endpoints(conn, organisation_id)
        counts = await delivery_counts(conn, organisation_id)
    await _record_read(request, principal, "webhook.list", None)
    return web.json_response(
        {
            "endpoints": [endpoint_json(endpoint, counts.get(endpoint.id)) for endpoint in found],
            "event_types": [kind.value for kind in EventType],
        }
    )


@routes.post(ENDPOINTS_PATH)
async def endpoint_create(request: web.Request) -> web.Response:
    """Register an endpoint; the answer holds its secret, shown this once."""
    principal = await require_role(request, Role.ADMIN, action="webhook.create")
    body = await read_json(request, NewEndpointBody)
    settings = request.app[SETTINGS].webhooks
    url = check_url(
        body.url,
        allow_http_loopback=settings.allow_http_loopback,
        allow_private_networks=settings.allow_private_networks,
        allowed_ports=settings.allowed_ports,
    )
    events = parse_event_types(body.events)
    async with request.app[DB_ENGINE].begin() as conn:
        endpoint, secret = await add_endpoint(
            conn,
            request.app[MASTER_KEY].key,
            principal.account.organisation_id,
            url=url,
            events=events,
            now=request.app[CLOCK].now(),
            payload=Payload(body.payload),
        )
        await _record(conn, request, principal, "webhook.create", endpoint.id)
    return web.json_response({"endpoint": endpoint_json(endpoint), "secret": secret}, status=201)


@routes.get(ENDPOINT_PATH + "/deliveries")
async def endpoint_deliveries(request: web.Request) -> web.Response:
    """The endpoint's latest 100 deliveries (of one status, if asked), newest first."""
    action = "webhook.deliveries.read"
    principal = await require_role(request, Role.ADMIN, action=action)
    params = query_params(request, frozenset({"status"}))
    status: DeliveryStatus | None = None
    if "status" in params:
        try:
            status = DeliveryStatus(params["status"])
        except ValueError:
            raise Unprocessable(
                "parameter 'status' must be one of: "
                + ", ".join(kind.value for kind in DeliveryStatus)
            ) from None
    endpoint_id = await _own_endpoint(request, principal, action)
    async with reading(request.app[DB_ENGINE]) as conn:
        entries = await recent_deliveries(conn, endpoint_id, status=status)
    await _record_read(request, principal, action, endpoint_id)
    return web.json_response({"deliveries": [delivery_json(entry) for entry in entries]})


@routes.post(ENDPOINT_PATH + "/rotate-secret")
async def endpoint_rotate_secret(request: web.Request) -> web.Response:
    """A new secret (shown this once); the one before signs too for a day."""
    action = "webhook.rotate-secret"
    principal = await require_role(request, Role.ADMIN, action=action)
    endpoint_id = await _own_endpoint(request, principal, action)
    async with request.app[DB_ENGINE].begin() as conn:
        endpoint, secret = await rotate_secret(
            conn,
            request.app[MASTER_KEY].key,
            endpoint_id,
            organisation_id=principal.account.organisation_id,
            now=request.app[CLOCK].now(),
        )
        await _record(conn, request, principal, action, endpoint_id)
    return web.json_response({"endpoint": endpoint_json(endpoint), "secret": secret})


@routes.delete(ENDPOINT_PATH)
async def endpoint_delete(request: web.Request) -> web.Response:
    """Delete the endpoint and its deliveries: what is pending is not sent."""
    action = "webhook.delete"
    principal = await require_role(request, Role.ADMIN, action=action)
    endpoint_id = await _own_endpoint(request, principal, action)
    async with request.app[DB_ENGINE].begin() as conn:
        await delete_endpoint(conn, endpoint_id, organisation_id=principal.account.organisation_id)
        await _record(conn, request, principal, action, endpoint_id)
    return web.Response(status=204)
