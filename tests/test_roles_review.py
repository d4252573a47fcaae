"""Review of roles and input handling in the HTTP API: failing tests, one
per defect found (each fails on the code as it is, for the reason its
docstring gives)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from audit.roles import Role
from audit.schema import access_log
from server.app_keys import DB_ENGINE
from tests.support.harness import Harness, Professional, new_consult


async def records_by(harness: Harness, professional: Professional) -> list[sa.Row[Any]]:
    async with harness.app[DB_ENGINE].connect() as conn:
        query = (
            sa.select(access_log)
            .where(access_log.c.actor_id == professional.account_id)
            .order_by(access_log.c.seq)
        )
        return list((await conn.execute(query)).all())


async def test_a_wrong_role_revoking_an_invite_is_recorded_as_a_revoke(
    sqlite_harness: Harness,
) -> None:
    """DELETE /api/consults/{id}/invite records every attempt as
    ``consult.invite.revoke`` (tests/test_consults.py), except the refusal
    for the wrong role: require_role is told ``consult.invite`` (the reissue's
    action), so a support user's attempt to revoke a patient's link reads in
    the access log as an attempt to issue a new one."""
    harness = sqlite_harness
    annas = await new_consult(harness, "anna@praktijk-noord.example")
    sam = await harness.professional("sam@praktijk-noord.example", Role.SUPPORT)
    await harness.logged_in(sam)
    response = await harness.client.delete(
        f"/api/consults/{annas.consult_id}/invite", headers=harness.headers
    )
    assert response.status == 403, await response.text()
    actions = [(row.action, row.outcome) for row in await records_by(harness, sam)]
    assert ("consult.invite.revoke", "refused") in actions, (
        f"the refused revoke is recorded as {actions[-1]}"
    )


async def test_a_body_with_a_key_given_twice_is_refused(sqlite_harness: Harness) -> None:
    """Request bodies are "validated strictly" (docs/openapi.yaml), but a JSON
    object naming a field twice is read as its last value (json.loads):
    ``{"consent": false, "consent": true}`` gets the patient a ticket, though
    the body says both that the patient did not agree and that they did.
    What a proxy, a log or another parser reads (often the first value) is
    not what the server acted on."""
    harness = sqlite_harness
    setup = await new_consult(harness)
    response = await harness.client.post(
        f"/api/invites/{setup.invite_token}/ticket",
        data=b'{"consent": false, "consent": true}',
        headers={**harness.headers, "Content-Type": "application/json"},
    )
    assert response.status in (400, 422), (
        f"a body naming 'consent' twice answered {response.status}: {await response.text()}"
    )


@pytest.mark.parametrize(
    "path",
    [
        # An admin who thinks the list is filtered gets every account.
        "/api/admin/accounts?role=therapist",
        # ... that the chain was verified for a range of days only.
        "/api/admin/access-log/verify?from=2026-11-01",
        # ... that only failing endpoints are listed.
        "/api/admin/webhooks?status=failed",
        "/api/admin/retention?consult_days=1",
        "/api/admin/practice-settings?x=1",
        "/api/admin/accounts?x=1&x=2",
    ],
)
async def test_an_admin_read_refuses_a_parameter_it_does_not_take(
    sqlite_harness: Harness, path: str
) -> None:
    """server/api/query.py: "Query parameters of the JSON API's read routes,
    checked strictly. An unknown, repeated or malformed parameter answers 422
    invalid_field naming it." The support routes, the lists and the access
    log do so (the technical log's route even checks that it takes none), but
    these admin reads never call query_params: an unknown or repeated
    parameter is silently ignored and the full answer comes back 200."""
    harness = sqlite_harness
    admin = await harness.professional("ada@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    response = await harness.client.get(path)
    assert response.status == 422, f"GET {path} answered {response.status}, not 422"
    assert (await response.json())["error"]["code"] == "invalid_field"
