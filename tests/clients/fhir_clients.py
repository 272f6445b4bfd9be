"""Unmodified FHIR client libraries against a carecache device's local API.

Usage: fhir_clients.py BASE_URL TOKEN NHS_NUMBER FAMILY BIRTHDATE
Prints one JSON object of what each library read; exits non-zero on any library error.
"""
import json
import sys

base, token, nhs, family, birthdate = sys.argv[1:6]
headers = {
    "Authorization": f"Bearer {token}",
    "X-Carecache-User": "n1",
    "X-Carecache-Purpose": "TREAT",
}
out = {}

# SMART on FHIR's Python client (fhirclient): search by NHS number, page through the
# alerts one at a time by the `next` links, read the patient summary document.
from fhirclient import client
from fhirclient.models.bundle import Bundle
from fhirclient.models.flag import Flag
from fhirclient.models.medicationstatement import MedicationStatement
from fhirclient.models.patient import Patient

smart = client.FHIRClient(settings={"app_id": "carecache-test", "api_base": base})
smart.server.session.headers.update(headers)
found = Patient.where(
    struct={"identifier": f"https://fhir.nhs.uk/Id/nhs-number|{nhs}", "_count": "10"}
).perform_resources(smart.server)
out["fhirclient_patient"] = [p.id for p in found if isinstance(p, Patient)]
flags = [
    r
    for r in Flag.where(struct={"patient": f"Patient/{nhs}", "_count": "1"}).perform_resources_iter(
        smart.server
    )
    if isinstance(r, Flag)
]
out["fhirclient_flags"] = sorted(f.id for f in flags)
meds = [
    r
    for r in MedicationStatement.where(
        struct={"patient": f"Patient/{nhs}", "_count": "2"}
    ).perform_resources_iter(smart.server)
    if isinstance(r, MedicationStatement)
]
out["fhirclient_medications"] = sorted(m.id for m in meds)
# Demographic search: the patient without their NHS number.
out["fhirclient_search"] = [
    p.id
    for p in Patient.where(struct={"family": family, "birthdate": birthdate}).perform_resources(
        smart.server
    )
    if isinstance(p, Patient)
]
summary = Bundle(smart.server.request_json(f"Patient/{nhs}/$summary"))
out["fhirclient_summary"] = {
    "type": summary.type,
    "sections": [s.title for s in summary.entry[0].resource.section],
    "entries": len(summary.entry),
}

# fhirpy (sync client): the same searches, every page fetched by the library.
from fhirpy import SyncFHIRClient

fp = SyncFHIRClient(
    base,
    authorization=f"Bearer {token}",
    extra_headers={k: v for k, v in headers.items() if k != "Authorization"},
)
out["fhirpy_patient"] = [
    p["id"]
    for p in fp.resources("Patient")
    .search(identifier=f"https://fhir.nhs.uk/Id/nhs-number|{nhs}")
    .fetch_all()
]
out["fhirpy_search"] = [
    p["id"] for p in fp.resources("Patient").search(family=family, birthdate=birthdate).fetch_all()
]
out["fhirpy_flags"] = sorted(
    f["id"] for f in fp.resources("Flag").search(patient=f"Patient/{nhs}").limit(1).fetch_all()
)
out["fhirpy_medications"] = sorted(
    m["id"]
    for m in fp.resources("MedicationStatement")
    .search(patient=f"Patient/{nhs}")
    .limit(2)
    .fetch_all()
)
print(json.dumps(out))
