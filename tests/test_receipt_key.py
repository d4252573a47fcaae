"""Only the admitted patient's page is given a receipt (nobody gets more than
their role).

A receipt lists every access record about its consult: who of the practice
looked at it, which only an admin reads otherwise (DESIGN.md, roles). It was
issued to whoever held the invite link, and the therapist holds it (they
send it): a therapist could ask for their patient's receipt and read it, and
the access log then said the patient read it. Now the request needs a key
the server gives the patient's socket only, once admitted (``admitted``, and
``welcome`` when the patient comes back to the running consult): never the
therapist's. Found in a role review; each test here failed before.
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

        # The patient back (a reload) in the running consult: the key again.
        again = await sockets.patient(setup.invite_token)
        welcome = await receive(again, "welcome")
        assert (welcome["state"], welcome["receipt_key"]) == ("active", key)
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
