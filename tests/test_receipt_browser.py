"""The patient's receipt in real Chromium: the end page offers it, and it shows
the consult's times and who looked at its record, in English and Dutch.

The patient is a browser; the therapist acts through the API and the
signaling socket (as the therapist's page would), so that the test needs no
second browser and no media between the two."""

from __future__ import annotations

import uuid
from zoneinfo import ZoneInfo

import pytest
from aiohttp import ClientWebSocketResponse
from playwright.async_api import Browser, BrowserContext, Page, expect

from audit.consults import mark_started
from audit.outbox import claim_due, record_disclosure
from audit.webhooks import EventType, add_endpoint
from server.app_keys import DB_ENGINE, MASTER_KEY
from tests.support.axe import assert_accessible
from tests.support.browser import (
    EXPECTED_HTTP_ERRORS,
    ScreenshotSaver,
    assert_no_browser_errors,
    patient_joins,
    patient_opens,
)
from tests.support.harness import ConsultSetup, Harness, consult_row, new_consult, receive

pytestmark = pytest.mark.browser

# The browser contexts' time zone (tests/support/browser.py, new_context).
ZONE = ZoneInfo("Europe/Amsterdam")


async def patient_in_a_consult(
    chromium: Browser, harness: Harness
) -> tuple[ConsultSetup, ClientWebSocketResponse, BrowserContext, Page]:
    """A consult, its therapist's socket, and the patient's page admitted to it."""
    setup = await new_consult(harness)
    therapist = await harness.client.ws_connect(
        f"/ws?consult={setup.consult_id}", headers=harness.headers
    )
    await receive(therapist, "welcome")
    context, patient = await patient_opens(
        chromium, harness, f"{harness.origin}/join/{setup.invite_token}"
    )
    receipt_requests: list[str] = []
    patient.on(
        "request", lambda r: receipt_requests.append(r.url) if r.url.endswith("/receipt") else None
    )
    await patient_joins(patient)
    await receive(therapist, "patient-waiting", timeout_s=15)
    # Not in the waiting room (the server would refuse): once admitted.
    assert receipt_requests == []
    async with patient.expect_response("**/receipt") as asked:
        await therapist.send_json({"v": 1, "type": "admit"})
    assert (await asked.value).status == 201
    await expect(patient.locator("#call")).to_be_visible()
    return setup, therapist, context, patient


async def test_the_patient_opens_the_receipt_from_the_end_page(
    chromium: Browser, live_harness: Harness, screenshot: ScreenshotSaver
) -> None:
    harness = live_harness
    setup, therapist, context, patient = await patient_in_a_consult(chromium, harness)
    harness.clock.advance(12 * 60)
    assert (await harness.client.get(f"/api/consults/{setup.consult_id}")).status == 200
    ended = await harness.post(f"/api/consults/{setup.consult_id}/end")
    assert ended.status == 200
    await therapist.close()

    await expect(patient.locator("#ended")).to_be_visible()
    offer = patient.locator("#receipt-offer")
    await expect(offer).to_be_visible()
    await assert_accessible(patient, "end page with the receipt offer")
    await screenshot(patient, "end-page-receipt-offer")
    link = patient.locator("#receipt-link")
    await expect(link).to_have_text("Your receipt of this consultation")
    href = await link.get_attribute("href")
    assert href is not None
    assert href.startswith(f"{harness.origin}/receipt/")
    # In Dutch too; the choice goes along to the receipt.
    await patient.select_option("#language", "nl")
    await expect(link).to_have_text("Uw bewijs van dit consult")
    await assert_accessible(patient, "end page with the receipt offer, in Dutch")
    await link.click()
    await patient.wait_for_url("**/receipt/*")

    await expect(patient.locator("#receipt")).to_be_visible()
    await expect(patient.get_by_role("heading", level=1)).to_have_text("Bewijs van uw videoconsult")
    rows = patient.locator("#access-rows tr")
    await expect(rows.locator("td:nth-child(4)").first).to_have_text("heeft het consult aangemaakt")
    await expect(patient.locator("#recording-text")).to_have_text("Dit consult is niet opgenomen.")
    await assert_accessible(patient, "receipt in Dutch")
    await screenshot(patient, "receipt-dutch")

    await patient.select_option("#language", "en")
    row = await consult_row(harness, setup.consult_id)
    start, end = row.started_at.astimezone(ZONE), row.ended_at.astimezone(ZONE)
    await expect(patient.get_by_role("heading", level=1)).to_have_text(
        "Receipt of your video consultation"
    )
    await expect(patient.locator("#consult-start")).to_have_text(start.strftime("%H:%M:%S"))
    await expect(patient.locator("#consult-end")).to_have_text(end.strftime("%H:%M:%S"))
    await expect(patient.locator("#consult-duration")).to_have_text("12 min 0 s")
    await expect(patient.locator("#consult-date")).to_contain_text(str(start.year))
    await expect(patient.locator("#recording-text")).to_have_text(
        "This consultation was not recorded."
    )
    therapist_id = str(setup.therapist.account_id)
    await expect(rows.locator("td:nth-child(4)")).to_have_text(
        [
            "created the consultation",
            "viewed the consultation",
            "ended the consultation",
            "viewed this receipt",
        ]
    )
    await expect(rows.locator("td:nth-child(3)")).to_have_text(
        [therapist_id, therapist_id, therapist_id, "you (this receipt)"]
    )
    await expect(rows.locator("td:nth-child(2)")).to_have_text(
        ["therapist", "therapist", "therapist", "patient"]
    )
    await assert_accessible(patient, "receipt")
    await screenshot(patient, "receipt")
    await patient.select_option("#language", "nl")

    # A receipt that is not known: the page says so, in the chosen language.
    await patient.goto(f"/receipt/{uuid.uuid4().hex}{uuid.uuid4().hex}")
    await expect(patient.locator("#unknown")).to_be_visible()
    await expect(patient.get_by_role("heading", level=1)).to_have_text(
        "Dit bewijs is niet beschikbaar"
    )
    await assert_accessible(patient, "unknown receipt in Dutch")
    await assert_no_browser_errors(
        context,
        allow=[
            *EXPECTED_HTTP_ERRORS,
            r"status of 404 .*/receipt/",
            r"status of 404 .*/api/receipts/",
        ],
    )


async def test_a_patient_who_reloads_in_the_call_is_still_offered_the_receipt(
    chromium: Browser, live_harness: Harness
) -> None:
    """The key a receipt needs comes once, with ``admitted``: a socket that
    joins the running consult later gets none (anyone with the invite link
    could open one, the therapist too). The page keeps it for the tab's
    life, so the patient's reload in the call still gets the receipt."""
    harness = live_harness
    setup, therapist, _context, patient = await patient_in_a_consult(chromium, harness)
    # A reload in the call goes straight back in (join.js, checkLink).
    async with patient.expect_response("**/receipt") as asked:
        await patient.reload()
    assert (await asked.value).status == 201
    await expect(patient.locator("#call")).to_be_visible()
    ended = await harness.post(f"/api/consults/{setup.consult_id}/end")
    assert ended.status == 200
    await therapist.close()
    await expect(patient.locator("#ended")).to_be_visible()
    await expect(patient.locator("#receipt-offer")).to_be_visible()


async def test_a_patient_whose_connection_dropped_until_the_end_is_offered_the_receipt(
    chromium: Browser, live_harness: Harness
) -> None:
    harness = live_harness
    setup, therapist, context, patient = await patient_in_a_consult(chromium, harness)
    # The patient's network drops, and the consult ends meanwhile.
    await patient.route("**/ticket", lambda route: route.abort())
    await patient.evaluate("() => window.videoconsult.call.ws.close()")
    await expect(patient.locator("#banner")).to_have_text("Connection lost. Reconnecting…")
    assert (await harness.post(f"/api/consults/{setup.consult_id}/end")).status == 200
    await therapist.close()
    await patient.unroute("**/ticket")

    await expect(patient.locator("#link-problem")).to_be_visible(timeout=20_000)
    await expect(patient.locator("#link-problem-text")).to_have_text("This consultation has ended.")
    link = patient.locator("#link-problem #receipt-link")
    await expect(link).to_be_visible()
    await assert_accessible(patient, "consult over, with the receipt offer")
    await link.click()
    await expect(patient.locator("#consult-status")).to_have_text("Ended")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)


async def test_the_receipt_says_when_the_details_went_to_the_practices_record_system(
    chromium: Browser, live_harness: Harness
) -> None:
    # Simulated here: only the HTTP send. The endpoint, its event, the claim
    # and the access record are the real ones (the sender does the same
    # after a 2xx answer); tests/test_receipt.py sends to a real receiver.
    harness = live_harness
    setup = await new_consult(harness)
    consult_id = uuid.UUID(setup.consult_id)
    async with harness.app[DB_ENGINE].begin() as conn:
        endpoint, _secret = await add_endpoint(
            conn,
            harness.app[MASTER_KEY].key,
            setup.therapist.organisation.id,
            url="https://records.praktijk-noord.example/hooks",
            events=(EventType.CONSULT_STARTED,),
            now=harness.clock.now(),
        )
        await mark_started(conn, consult_id, now=harness.clock.now())
    receipt = await harness.issue_receipt(setup.invite_token, setup.consult_id)
    assert receipt.status == 201
    async with harness.app[DB_ENGINE].begin() as conn:
        (due,) = await claim_due(conn, now=harness.clock.now(), lease_s=20, limit=5)
        await record_disclosure(
            conn,
            due,
            endpoint_id=endpoint.id,
            organisation_id=endpoint.organisation_id,
            now=harness.clock.now(),
        )
    context, page = await patient_opens(chromium, harness, (await receipt.json())["receipt_url"])
    rows = page.locator("#access-rows tr")
    await expect(rows.locator("td:nth-child(4)")).to_have_text(
        [
            "created the consultation",
            "sent the details (times, the therapist's code) to the practice's own record system",
            "viewed this receipt",
        ]
    )
    await expect(rows.locator("td:nth-child(2)")).to_have_text(
        ["therapist", "the system", "patient"]
    )
    await expect(rows.nth(1).locator("td:nth-child(3)")).to_have_text(str(endpoint.id))
    await page.select_option("#language", "nl")
    await expect(rows.nth(1).locator("td:nth-child(4)")).to_have_text(
        "heeft de gegevens (tijden, de code van de therapeut) naar het eigen dossiersysteem"
        " van de praktijk gestuurd"
    )
    await expect(rows.nth(1).locator("td:nth-child(2)")).to_have_text("het systeem")
    await assert_accessible(page, "receipt with a message to the record system, in Dutch")
    await assert_no_browser_errors(context, allow=EXPECTED_HTTP_ERRORS)
