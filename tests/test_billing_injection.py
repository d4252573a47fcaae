"""CSV injection in the billing export, found in review of the CSV for Excel:
each a test that failed before its fix."""

from __future__ import annotations

import csv
import io

from audit.practice import PracticeSettings, set_practice_settings
from audit.roles import Role
from server.app_keys import DB_ENGINE
from tests.support.harness import Harness, new_consult

# OWASP, CSV injection: a cell that starts with one of these is a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


async def test_the_plain_csv_opened_in_a_semicolon_locale_starts_no_formula(
    harness: Harness,
) -> None:
    """docs/admin.md: opened by a double click, Excel in a European locale
    (NL, DE, FR, BE: list separator ';', the practices' locales) splits the
    plain CSV at semicolons; the commit promises "in both CSVs no cell starts
    a formula". A therapist's appointment reference (1 to 64 printable
    characters: ';' allowed) with a ';' before '=' starts a cell of its own
    there, and that cell is a formula (OWASP: "take care of the field
    separator ... as attackers could use this to start a new cell").

    Excel's reading is modelled (the one fake, at the spreadsheet boundary)
    by Python's csv reader with delimiter ';': both treat a quote as quoting
    only at the start of a field."""
    organisation = await harness.organisation()
    async with harness.app[DB_ENGINE].begin() as conn:
        await set_practice_settings(
            conn,
            organisation.id,
            PracticeSettings(True, None, appointment_reference_allowed=True),
            now=harness.clock.now(),
        )
    # Set by a therapist, exported by the admin for a bookkeeper's Excel.
    setup = await new_consult(harness, appointment_reference="A-17;=cmd|' /C calc'!A0")
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    month = f"{harness.clock.now():%Y-%m}"

    response = await harness.client.get(f"/api/admin/billing?month={month}&format=csv")
    assert response.status == 200, await response.text()
    body = (await response.read()).decode("utf-8")
    assert setup.consult_id in body
    as_excel_in_nl_reads_it = list(csv.reader(io.StringIO(body), delimiter=";"))
    formulas = [
        cell for row in as_excel_in_nl_reads_it for cell in row if cell.startswith(FORMULA_STARTS)
    ]
    assert formulas == []
