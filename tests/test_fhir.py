"""A consult's event as a FHIR R4 Encounter (issue 21, item 5): built from
the event's data, valid by fhir.resources' own models, and holding nothing
about the patient."""

from __future__ import annotations

import uuid

import pytest
from fhir.resources.R4B.encounter import Encounter

from audit.fhir import encounter_of

CONSULT = str(uuid.UUID(int=7))
ENDED = {
    "consult_id": CONSULT,
    "scheduled_at": "2026-11-02T09:00:00Z",
    "started_at": "2026-11-02T09:01:00Z",
    "ended_at": "2026-11-02T09:51:00Z",
    "duration_s": 3000,
    "status": "ended",
    "end_reason": "ended_by_therapist",
    "therapist": "T-4F2A91C03B7E",
}


def test_an_ended_consult_is_a_finished_virtual_encounter() -> None:
    encounter = encounter_of(ENDED)
    assert encounter["resourceType"] == "Encounter"
    assert encounter["id"] == CONSULT
    assert encounter["status"] == "finished"
    assert encounter["class"] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "code": "VR",
        "display": "virtual",
    }
    assert encounter["period"] == {"start": "2026-11-02T09:01:00Z", "end": "2026-11-02T09:51:00Z"}
    assert encounter["length"] == {
        "value": 3000,
        "unit": "s",
        "system": "http://unitsofmeasure.org",
        "code": "s",
    }
    assert encounter["identifier"] == [
        {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{CONSULT}"}
    ]
    [performer] = encounter["participant"]
    assert performer["individual"]["identifier"]["value"] == "T-4F2A91C03B7E"
    assert performer["type"][0]["coding"][0]["code"] == "PPRF"
    # Nothing about the patient: no subject, no other participant.
    assert "subject" not in encounter
    # What it says is a valid Encounter, read back by the library.
    assert Encounter.model_validate(encounter).status == "finished"


@pytest.mark.parametrize(
    ("status", "fhir_status"),
    [
        ("created", "planned"),
        ("active", "in-progress"),
        ("not_started", "cancelled"),
        ("something_new", "unknown"),
    ],
)
def test_each_status_has_its_encounter_status(status: str, fhir_status: str) -> None:
    data = {
        "consult_id": CONSULT,
        "status": status,
        "started_at": "2026-11-02T09:01:00Z" if status == "active" else None,
        "ended_at": None,
        "duration_s": None,
        "therapist": None,
    }
    encounter = encounter_of(data)
    assert encounter["status"] == fhir_status
    assert "length" not in encounter
    assert "participant" not in encounter  # an erased therapist: no pseudonym
    if status == "active":
        assert encounter["period"] == {"start": "2026-11-02T09:01:00Z"}
    else:
        assert "period" not in encounter


def test_the_practices_appointment_reference_is_an_identifier() -> None:
    encounter = encounter_of({**ENDED, "appointment_reference": "AGENDA-2026-1187"})
    assert encounter["identifier"][1] == {
        "use": "usual",
        "system": "urn:videoconsult:appointment-reference",
        "value": "AGENDA-2026-1187",
    }


def test_data_that_makes_no_valid_encounter_is_refused() -> None:
    with pytest.raises(ValueError, match="Encounter"):
        encounter_of({**ENDED, "started_at": "yesterday"})
