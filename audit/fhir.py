"""A consult's event as a FHIR R4 ``Encounter`` (issue 21, item 5).

A practice's record system that speaks FHIR can take ``consult.started``
and ``consult.ended`` as an ``Encounter`` instead of the Standard Webhooks
body (a webhook endpoint's ``payload`` is then ``fhir``). Built from the
event's data alone, so it holds what that holds: the consult's id, status,
period and length, the therapist's pseudonym (or the external id an admin
set for the account); no patient (``subject`` is
optional in FHIR and left out: videoconsult does not know the patient), and
the practice's appointment reference as an identifier where there is one.
The appointment's time and the end reason have no place in a plain
Encounter (its ``appointment`` is a reference to the practice's own
Appointment resource, which the reference above names); they stay in the
Standard Webhooks body.

Validated with ``fhir.resources``' R4B models: R4B is FHIR 4.3, whose
``Encounter`` is R4's (4.0.1) unchanged; ``fhir.resources`` 8 has no 4.0.1
package of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir.resources.R4B.encounter import Encounter

# The consult's status (as stored) as an Encounter's.
_STATUS = {
    "created": "planned",
    "active": "in-progress",
    "ended": "finished",
    "not_started": "cancelled",
}
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
UCUM = "http://unitsofmeasure.org"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
# The consult's id as an identifier (RFC 3986: urn:uuid:...).
URI_SYSTEM = "urn:ietf:rfc:3986"
# Where the identifiers of this installation's own terms live (end reasons,
# therapists' pseudonyms): a URN of the project's, not a web address.
VIDEOCONSULT_SYSTEM = "urn:videoconsult"
# The therapist's identifier's system under it, by how the event names them:
# the installation's pseudonym, or the external id an admin set (the
# practice's own id for the person).
_THERAPIST_SYSTEMS = {"pseudonym": "therapist", "external": "external-id"}


def encounter_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """The Encounter (as JSON) of a ``consult.started``/``consult.ended`` event's data.

    Raises ``pydantic.ValidationError`` when the result is not a valid
    Encounter (a bug: the data comes from the consult's own record).
    """
    consult_id = data["consult_id"]
    identifiers = [{"system": URI_SYSTEM, "value": f"urn:uuid:{consult_id}"}]
    if data.get("appointment_reference"):
        identifiers.append(
            {
                "system": f"{VIDEOCONSULT_SYSTEM}:appointment-reference",
                "value": data["appointment_reference"],
                "use": "usual",
            }
        )
    encounter: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": consult_id,
        "identifier": identifiers,
        "status": _STATUS.get(data.get("status") or "", "unknown"),
        "class": {"system": ACT_CODE, "code": "VR", "display": "virtual"},
    }
    period = {
        key: data[name]
        for key, name in (("start", "started_at"), ("end", "ended_at"))
        if data.get(name)
    }
    if period:
        encounter["period"] = period
    if data.get("duration_s") is not None:
        encounter["length"] = {
            "value": data["duration_s"],
            "unit": "s",
            "system": UCUM,
            "code": "s",
        }
    if data.get("therapist"):
        kind = data.get("therapist_id_kind") or "pseudonym"
        encounter["participant"] = [
            {
                "type": [
                    {
                        "coding": [
                            {
                                "system": PARTICIPATION_TYPE,
                                "code": "PPRF",
                                "display": "primary performer",
                            }
                        ]
                    }
                ],
                "individual": {
                    "identifier": {
                        "system": f"{VIDEOCONSULT_SYSTEM}:{_THERAPIST_SYSTEMS[kind]}",
                        "value": data["therapist"],
                    }
                },
            }
        ]
    validated = Encounter.model_validate(encounter)
    result: dict[str, Any] = validated.model_dump(mode="json", exclude_none=True)
    return result
