"""The billing export's CSV, as a file: the plain one for programs (RFC 4180,
commas, UTF-8 without a byte-order mark) and the one for Excel in a European
locale (a byte-order mark, semicolons, ids that stay text); neither lets a
spreadsheet run a cell as a formula."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime

import pytest

from audit.billing import BilledConsult, ExportFormat, as_csv, parse_format
from audit.consults import ConsultStatus

THERAPIST = uuid.UUID("0b6a3f3e-5b1e-4c55-9d0e-2f6f1c1d2a01")
CONSULT = uuid.UUID("6f1d2c3b-4a59-4e8f-8a7b-6c5d4e3f2a10")
STARTED = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def held(
    *,
    therapist: str = "anna@praktijk-noord.example",
    external_id: str | None = "Müller-Çelik",
    reference: str | None = "00123",
) -> BilledConsult:
    return BilledConsult(
        therapist_id=THERAPIST,
        therapist=therapist,
        consult_id=CONSULT,
        created_at=STARTED,
        scheduled_at=None,
        started_at=STARTED,
        ended_at=datetime(2026, 11, 2, 9, 50, tzinfo=UTC),
        duration_s=3000,
        status=ConsultStatus.ENDED,
        appointment_reference=reference,
        therapist_external_id=external_id,
    )


def read(body: bytes, *, delimiter: str = ",", encoding: str = "utf-8") -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(body.decode(encoding)), delimiter=delimiter))


def test_the_plain_csv_is_rfc_4180_utf_8_without_a_byte_order_mark() -> None:
    body = as_csv([held()], UTC)
    assert body.startswith(b"therapist_id,therapist,therapist_external_id,consult_id,")
    assert body.endswith(b"\r\n")
    (row,) = read(body)
    # Exact values for a program: no marks of the Excel variant.
    assert row["therapist_external_id"] == "Müller-Çelik"
    assert row["appointment_reference"] == "00123"
    assert (row["date"], row["duration_s"], row["scheduled_at"]) == ("2026-11-02", "3000", "")


def test_the_excel_csv_starts_with_a_byte_order_mark_and_uses_semicolons() -> None:
    body = as_csv([held()], UTC, ExportFormat.EXCEL)
    # Without the mark Excel reads UTF-8 as Windows-1252: "MÃ¼ller".
    assert body.startswith(b"\xef\xbb\xbftherapist_id;therapist;therapist_external_id;")
    assert body.endswith(b"\r\n")
    (row,) = read(body, delimiter=";", encoding="utf-8-sig")
    assert row["therapist"] == "anna@praktijk-noord.example"
    assert row["consult_id"] == str(CONSULT)
    # A date Excel makes a date, a whole number it makes a number.
    assert (row["date"], row["duration_s"], row["scheduled_at"]) == ("2026-11-02", "3000", "")


@pytest.mark.parametrize(
    "text",
    [
        "00123",  # leading zeros: Excel would show 123
        "12345678901234567890",  # long digits: Excel would show 1,23457E+19
        "1-2",  # Excel would make a date of it
        "1E5",  # and a number of this
        "Müller-Çelik",
    ],
)
def test_the_excel_csv_keeps_ids_text(text: str) -> None:
    body = as_csv([held(external_id=text, reference=text)], UTC, ExportFormat.EXCEL)
    (row,) = read(body, delimiter=";", encoding="utf-8-sig")
    # ="…" is a text constant for Excel: shown as written, never converted.
    assert row["therapist_external_id"] == f'="{text}"'
    assert row["appointment_reference"] == f'="{text}"'


def test_a_quote_in_an_id_cannot_end_excels_text_constant() -> None:
    body = as_csv(
        [held(reference='7" & HYPERLINK("http://x.example") & "')], UTC, ExportFormat.EXCEL
    )
    (row,) = read(body, delimiter=";", encoding="utf-8-sig")
    assert row["appointment_reference"] == '="7"" & HYPERLINK(""http://x.example"") & """'


def test_an_empty_cell_stays_empty_in_both() -> None:
    for export_format in (ExportFormat.CSV, ExportFormat.EXCEL):
        body = as_csv([held(external_id=None, reference=None)], UTC, export_format)
        delimiter = ";" if export_format is ExportFormat.EXCEL else ","
        (row,) = read(body, delimiter=delimiter, encoding="utf-8-sig")
        assert (row["therapist_external_id"], row["appointment_reference"]) == ("", "")


FORMULAS = [
    '=HYPERLINK("http://x.example","Click")',
    "+31 6 1234",
    "-2+3",
    "@SUM(A1)",
    "\t=1+1",
    "\r=1+1",
]


@pytest.mark.parametrize("text", FORMULAS)
def test_no_cell_of_the_plain_csv_starts_a_formula(text: str) -> None:
    # OWASP, CSV injection: a cell that starts with = + - @ tab or CR is a
    # formula to a spreadsheet; a single quote before it makes it text.
    body = as_csv([held(therapist=text, external_id=text, reference=text)], UTC)
    (row,) = read(body)
    assert row["therapist"] == f"'{text}"
    assert row["therapist_external_id"] == f"'{text}"
    assert row["appointment_reference"] == f"'{text}"


@pytest.mark.parametrize("text", FORMULAS)
def test_no_cell_of_the_excel_csv_starts_a_formula(text: str) -> None:
    body = as_csv([held(therapist=text, external_id=text, reference=text)], UTC, ExportFormat.EXCEL)
    (row,) = read(body, delimiter=";", encoding="utf-8-sig")
    assert row["therapist"] == f"'{text}"
    # Text in Excel already, and text still if a bookkeeper saves it as CSV again.
    quoted = text.replace('"', '""')
    assert row["therapist_external_id"] == f'="\'{quoted}"'
    assert row["appointment_reference"] == f'="\'{quoted}"'


def test_the_format_is_one_of_three() -> None:
    assert [parse_format(name) for name in ("json", "csv", "excel")] == [
        ExportFormat.JSON,
        ExportFormat.CSV,
        ExportFormat.EXCEL,
    ]
    with pytest.raises(ValueError, match="json, csv or excel"):
        parse_format("xlsx")
