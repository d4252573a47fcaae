"""Only the admitted patient's page is given a receipt (nobody gets more than
their role).

A receipt lists every access record about its consult: who of the practice
looked at it, which only an admin reads otherwise (DESIGN.md, roles). It was
issued to whoever held the invite link, and the therapist holds it (they
send it): a therapist could ask for their patient's receipt and read it, and
the access log then said the patient read it. Now the request needs a key
the server gives once, to the socket it admits (``admitted``): never the
therapist's, nor a socket that joins the running consult later (anyone with
the link can open one; the patient's page keeps its key for the tab's life).
Found in a role review, and its gaps in the review of the change; each test
here failed before, but the waiting room's, which guards what was already so.

Left as it is: a therapist who opens a patient socket with the link before
the patient comes, and admits it, is given the key. That starts the consult
without the patient (its recorded start says so), and a patient's page that
is already in the waiting room is replaced, which it shows.
"""

from __future__ import annotations

import sqlalchemy as sa

from audit.schema import receipts
from server.app_keys import DB_ENGINE
from tests.support.harness import Harness, Sockets, receive, waiting_pair


async def _receipts(harness: Harness) -> int:
    async with harness.app[DB_ENGINE].connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(receipts)) or 0)


async def test_only_the_admitted_patients_socket_gets_the_key_a_receipt_needs(
    harness: Harness,
) -> None:
    sockets = Sockets(harness)
    try:
        setup, therapist, patient = await waiting_pair(harness, sockets)
        await therapist.send_json({"v": 1, "type": "admit"})
        admitted = await receive(patient, "admitted")
        key = admitted["receipt_key"]
        assert isinstance(key, str)
        assert len(key) >= 43
        assert "receipt_key" not in await receive(therapist, "peer-joined")
        url = f"/api/invites/{setup.invite_token}/receipt"

        # The invite link alone, as the therapist holds it: refused, nothing issued.
        without = await harness.post(url)
        assert without.status == 422, await without.text()
        assert "receipt_key" in (await without.json())["error"]["message"]
        wrong = await harness.post(url, {"receipt_key": key[:-4] + "AAAA"})
        assert wrong.status == 403, await wrong.text()
        assert (await wrong.json())["error"]["code"] == "receipt_key_wrong"
        assert await _receipts(harness) == 0

        issued = await harness.post(url, {"receipt_key": key})
        assert issued.status == 201, await issued.text()
        assert await _receipts(harness) == 1

        # A patient socket anew in the running consult (the patient's page
        # reloaded, or anyone else with the link): no key; the patient's page
        # keeps the one it was given for the tab's life.
        again = await sockets.patient(setup.invite_token)
        welcome = await receive(again, "welcome")
        assert welcome["state"] == "active"
        assert "receipt_key" not in welcome
        # The therapist's socket anew: never a key.
        therapist_again = await sockets.therapist(setup.consult_id)
        assert "receipt_key" not in await receive(therapist_again, "welcome")
    finally:
        await sockets.close()


async def test_a_waiting_patient_is_given_no_key(harness: Harness) -> None:
    """Before the consult starts there is no receipt to give (it would tell
    that the patient came): the waiting room's ``welcome`` has no key."""
    sockets = Sockets(harness)
    try:
        setup = await waiting_pair(harness, sockets)
        patient_again = await sockets.patient(setup[0].invite_token)
        welcome = await receive(patient_again, "welcome")
        assert welcome["state"] == "waiting"
        assert "receipt_key" not in welcome
    finally:
        await sockets.close()


# Found by the review of this change (a helper's, in a worktree of its own).


async def test_a_receipt_key_that_is_not_ascii_answers_403_not_500(harness: Harness) -> None:
    """The body's ``receipt_key`` (any text of 1 to 128 characters) went to
    ``hmac.compare_digest(str, str)`` (audit/receipts.py,
    ``receipt_key_matches``), which raises TypeError for a str with any
    non-ASCII character: the request answered 500 internal_error with a
    traceback instead of 403 receipt_key_wrong. The key is compared as bytes
    now."""
    sockets = Sockets(harness)
    try:
        setup, therapist, patient = await waiting_pair(harness, sockets)
        await therapist.send_json({"v": 1, "type": "admit"})
        await receive(patient, "admitted")
        response = await harness.post(
            f"/api/invites/{setup.invite_token}/receipt", {"receipt_key": "sleutel-é"}
        )
        assert response.status in (403, 422), (response.status, await response.text())
        assert await _receipts(harness) == 0
    finally:
        await sockets.close()


async def test_a_therapist_joining_as_the_patient_in_the_grace_period_gets_no_key(
    harness: Harness,
) -> None:
    """The therapist holds the invite link, and the ticket endpoint gives a
    patient ticket to anyone who holds it (here the therapist's own logged-in
    client). While the patient is in their grace period (a dropped
    connection), the therapist opened a patient socket with the link and read
    ``receipt_key`` from its ``welcome``, which carried it for every patient
    socket joining a running consult. Only ``admitted`` carries it now."""
    sockets = Sockets(harness)
    try:
        setup, therapist, patient = await waiting_pair(harness, sockets)
        await therapist.send_json({"v": 1, "type": "admit"})
        await receive(patient, "admitted")
        await receive(therapist, "peer-joined")
        await patient.close()  # the patient's connection drops: grace period
        # The therapist's own client (logged in: harness.client has the cookie).
        async with harness.client.post(
            f"/api/invites/{setup.invite_token}/ticket",
            json={"consent": True, "guardian_consent": True},
            headers=harness.headers,
        ) as response:
            assert response.status == 200, await response.text()
            ticket = (await response.json())["ticket"]
        fake = await harness.client.ws_connect(f"/ws?ticket={ticket}", headers=harness.headers)
        try:
            welcome = await receive(fake, "welcome")
        finally:
            await fake.close()
        assert "receipt_key" not in welcome, (
            f"the therapist's client got the patient's receipt key: {welcome.get('receipt_key')!r}"
        )
    finally:
        await sockets.close()
